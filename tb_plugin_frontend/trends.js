// The trends view: the cnnvis metric scalars (/metrics) as small multiples, one chart per metric of the chosen
// kind and layer, one line per run in its run colour. Hovering shows run, step and value; the grid's current step
// is marked on every chart; clicking a point asks the app to show that step. Drawn as plain SVG by this module:
// no chart library, nothing fetched from elsewhere, every name set as text.

import {el, field, select} from "./dom.js";
import {emptyMessage, errorView} from "./messages.js";

const SVG = "http://www.w3.org/2000/svg";
/** Chart size in CSS pixels, and the room kept for the axes' labels. */
const WIDTH = 260;
const HEIGHT = 150;
const PAD = {left: 44, right: 10, top: 8, bottom: 22};
/** A pointer farther than this from every point shows no tooltip. */
const HOVER_PIXELS = 24;

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

/** A value as an axis or tooltip shows it: 4 significant digits, no exponent for everyday magnitudes. */
export function formatValue(value) {
  if (value === null || value === undefined) return "–";
  if (value === 0) return "0";
  const magnitude = Math.abs(value);
  if (magnitude >= 1e5 || magnitude < 1e-3) return value.toExponential(2);
  return String(Number(value.toPrecision(4)));
}

/** The key of a (kind, layer) group of series: what the "Metrics of" list offers. */
function groupKey(kind, layer) {
  return `${kind}/${layer}`;
}

/** Series groups in the answer's order: [{key, kind, layer, series: [...]}]. */
function groupsOf(answer) {
  const groups = new Map();
  for (const series of answer.series) {
    const key = groupKey(series.kind, series.layer);
    if (!groups.has(key)) groups.set(key, {key, kind: series.kind, layer: series.layer, series: []});
    groups.get(key).series.push(series);
  }
  return [...groups.values()];
}

/** Nice round ticks covering [lo, hi]: about `count` of them. */
function ticks(lo, hi, count = 3) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) ?? raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

/** One chart: a series' lines for the shown runs, its axes, its step marker and its hover/click handling. */
class Chart {
  constructor(series, {runs, colorOf, stepRange, onPickStep, tooltip, title}) {
    this.series = series;
    this.tooltip = tooltip;
    const [x0, x1] = stepRange;
    const shown = series.runs.filter((r) => runs.includes(r.run));
    const values = shown.flatMap((r) => r.values.filter((v) => v !== null));
    let lo = Math.min(...values);
    let hi = Math.max(...values);
    if (!values.length) [lo, hi] = [0, 1];
    if (hi === lo) [lo, hi] = [lo - (Math.abs(lo) || 1) * 0.05, hi + (Math.abs(hi) || 1) * 0.05];
    const span = hi - lo;
    [lo, hi] = [lo - span * 0.06, hi + span * 0.06];
    const innerW = WIDTH - PAD.left - PAD.right;
    const innerH = HEIGHT - PAD.top - PAD.bottom;
    this.x = (step) => PAD.left + (x1 > x0 ? ((step - x0) / (x1 - x0)) * innerW : innerW / 2);
    this.y = (value) => PAD.top + (1 - (value - lo) / (hi - lo)) * innerH;

    const root = svg("svg", {
      class: "cv-trend-svg",
      width: WIDTH,
      height: HEIGHT,
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      role: "img",
      "aria-label": `${title} over the steps`,
    });
    const axes = svg("g", {class: "cv-trend-axes"});
    for (const v of ticks(lo, hi)) {
      if (v < lo || v > hi) continue;
      axes.append(svg("line", {x1: PAD.left, x2: WIDTH - PAD.right, y1: this.y(v), y2: this.y(v), class: "cv-trend-grid"}));
      axes.append(svg("text", {x: PAD.left - 4, y: this.y(v) + 3, "text-anchor": "end"}, formatValue(v)));
    }
    const bottom = HEIGHT - PAD.bottom;
    axes.append(svg("line", {x1: PAD.left, x2: WIDTH - PAD.right, y1: bottom, y2: bottom, class: "cv-trend-axis"}));
    axes.append(svg("text", {x: PAD.left, y: bottom + 14, "text-anchor": "start"}, x0));
    if (x1 > x0) axes.append(svg("text", {x: WIDTH - PAD.right, y: bottom + 14, "text-anchor": "end"}, x1));
    root.append(axes);

    this.marker = svg("line", {class: "cv-trend-marker", y1: PAD.top, y2: bottom, visibility: "hidden"});
    root.append(this.marker);

    this.points = [];
    for (const {run, steps, values: vals} of shown) {
      const color = colorOf(run);
      const group = svg("g", {class: "cv-trend-run", "data-run": run});
      // A missing value (null) breaks the line rather than joining across it.
      let path = "";
      let pen = false;
      steps.forEach((step, i) => {
        if (vals[i] === null) {
          pen = false;
          return;
        }
        path += `${pen ? "L" : "M"}${this.x(step).toFixed(1)},${this.y(vals[i]).toFixed(1)}`;
        pen = true;
      });
      group.append(svg("path", {d: path, stroke: color, class: "cv-trend-line"}));
      steps.forEach((step, i) => {
        if (vals[i] === null) return;
        const point = svg("circle", {
          cx: this.x(step),
          cy: this.y(vals[i]),
          r: 2.5,
          fill: color,
          class: "cv-trend-point",
          "data-run": run,
          "data-step": step,
          "data-value": vals[i],
        });
        group.append(point);
        this.points.push({run, step, value: vals[i], cx: this.x(step), cy: this.y(vals[i]), node: point});
      });
      root.append(group);
    }
    this.hot = null;
    root.addEventListener("mousemove", (event) => this.hover(event));
    root.addEventListener("mouseleave", () => this.unhover());
    root.addEventListener("click", (event) => {
      const point = this.nearest(event);
      if (point) onPickStep(point.step);
    });
    this.element = el("figure", {className: "cv-trend", attrs: {"data-tag": series.tag}}, [
      el("figcaption", {className: "cv-trend-title", text: title, attrs: {title: series.tag}}),
    ]);
    this.element.append(root);
    this.svg = root;
    if (!shown.length) this.element.append(el("p", {className: "cv-note", text: "No shown run logged this metric."}));
  }

  /** The point nearest to the pointer of `event`, within `HOVER_PIXELS`, or null. */
  nearest(event) {
    const box = this.svg.getBoundingClientRect();
    const px = ((event.clientX - box.left) / box.width) * WIDTH;
    const py = ((event.clientY - box.top) / box.height) * HEIGHT;
    let best = null;
    let bestDistance = HOVER_PIXELS;
    for (const point of this.points) {
      const distance = Math.hypot(point.cx - px, point.cy - py);
      if (distance < bestDistance) [best, bestDistance] = [point, distance];
    }
    return best;
  }

  hover(event) {
    const point = this.nearest(event);
    if (this.hot && this.hot !== point) this.hot.node.classList.remove("cv-hot");
    this.hot = point;
    if (!point) {
      this.tooltip.hide();
      return;
    }
    point.node.classList.add("cv-hot");
    // Runs whose points coincide with the nearest one (a copied run, equal values) are all named.
    const together = this.points.filter((p) => p.step === point.step && Math.abs(p.cy - point.cy) < 1);
    this.tooltip.show(event, together);
  }

  unhover() {
    this.hot?.node.classList.remove("cv-hot");
    this.hot = null;
    this.tooltip.hide();
  }

  /** Marks `step` (or hides the marker when it is null or outside the chart's steps). */
  mark(step) {
    if (step === null || step === undefined) {
      this.marker.setAttribute("visibility", "hidden");
      return;
    }
    const x = this.x(step);
    this.marker.setAttribute("x1", x);
    this.marker.setAttribute("x2", x);
    this.marker.setAttribute("visibility", "visible");
    this.marker.dataset.step = String(step);
  }
}

/** The one floating box showing the hovered point's run, step and value. */
class Tooltip {
  constructor(colorOf) {
    this.colorOf = colorOf;
    this.element = el("div", {className: "cv-tooltip", attrs: {role: "tooltip", hidden: ""}});
  }

  /** Shows `points` (one or more runs at one step) next to the pointer of `event`. */
  show(event, points) {
    const rows = points.map(({run, step, value}) => {
      const swatch = el("span", {className: "cv-swatch"});
      swatch.style.setProperty("--run-color", this.colorOf(run));
      return el("div", {className: "cv-tooltip-row"}, [
        el("span", {className: "cv-run"}, [swatch, el("span", {className: "cv-run-name", text: run})]),
        el("span", {className: "cv-tooltip-value", text: `step ${step} · ${formatValue(value)}`}),
      ]);
    });
    this.element.replaceChildren(...rows);
    this.element.hidden = false;
    const pad = 12;
    const {innerWidth: w, innerHeight: h} = window;
    const box = this.element.getBoundingClientRect();
    const left = Math.min(event.clientX + pad, w - box.width - 4);
    const top = event.clientY + pad + box.height > h ? event.clientY - pad - box.height : event.clientY + pad;
    this.element.style.left = `${Math.max(4, left)}px`;
    this.element.style.top = `${Math.max(4, top)}px`;
  }

  hide() {
    this.element.hidden = true;
  }
}

/**
 * The trends card. `update(answer, selection)` redraws it for the /metrics answer, the runs shown and the grid's
 * kind and layer; `mark(step)` moves the step marker of every chart.
 */
export class Trends {
  /**
   * @param {{colorOf: function(string): string, onPickStep: function(number),
   *          onGroup: function(string)}} options
   *   `onPickStep(step)` when a point is clicked; `onGroup(key)` when the user picks another group of metrics.
   */
  constructor({colorOf, onPickStep, onGroup}) {
    Object.assign(this, {colorOf, onPickStep, onGroup});
    this.tooltip = new Tooltip(colorOf);
    this.body = el("div", {className: "cv-trends"});
    this.head = el("div", {className: "cv-card-head"}, [el("h2", {className: "cv-card-title", text: "Trends"})]);
    this.subtitle = el("p", {className: "cv-card-subtitle"});
    this.element = el("section", {className: "cv-card cv-trends-card"}, [this.head, this.subtitle, this.body, this.tooltip.element]);
    this.charts = [];
    this.step = null;
    this.filters = new Map(); // variant key -> the value picked ("method" -> "gradcam++")
  }

  /** A select per way the group's series vary that has a choice (method, target, image), set as last picked. */
  variantSelects(group) {
    const labels = {method: "Method", target: "Target", image: "Image"};
    const out = [];
    for (const key of ["method", "target", "image"]) {
      const values = [...new Set(group.series.map((s) => s.variant[key]).filter((v) => v !== undefined))];
      if (key === "method") values.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)); // a name before its longer variants (x before x++)
      if (key === "image" ? !values.length : values.length < 2) continue;
      const options = values.map((v) => [v, key === "image" ? v.replace(/^probe_0*(\d)/, "probe image $1") : v]);
      if (key === "image") options.unshift(["", "mean of the probe"]);
      const fallback = key === "target" && values.includes("true") ? "true" : key === "image" ? "" : values[0];
      const picked = this.filters.get(key);
      const value = options.some(([v]) => v === picked) ? picked : fallback;
      const control = select(options, value, (v) => {
        this.filters.set(key, v);
        this.update(this.answer, this.selection);
      }, `Trends ${labels[key].toLowerCase()}`); // not "Image": the controls bar has that list
      out.push({key, label: labels[key], control});
    }
    return out;
  }

  /** The group a selection shows: the wanted one, else the grid's kind and layer, else that kind's first group,
   *  else metrics of the whole probe (accuracy), else the first. */
  static pickGroup(groups, {wanted, kind, layer}) {
    return (
      groups.find((g) => g.key === wanted) ??
      groups.find((g) => g.kind === kind && g.layer === layer) ??
      groups.find((g) => g.kind === kind) ??
      groups.find((g) => g.layer === "probe") ??
      groups[0]
    );
  }

  /**
   * @param {{runs: string[], series: Array}} answer what /metrics answered
   * @param {{runs: string[], wanted: ?string, kind: string, layer: string}} selection the shown runs, the group
   *   the user picked (null: follow the grid) and the grid's kind and layer
   */
  update(answer, selection) {
    Object.assign(this, {answer, selection});
    this.tooltip.hide();
    const groups = groupsOf(answer);
    if (!groups.length) {
      this.head.replaceChildren(el("h2", {className: "cv-card-title", text: "Trends"}));
      this.subtitle.textContent = "";
      this.body.replaceChildren(
        emptyMessage(
          "No metrics logged yet: these runs hold no cnnvis/metrics/… scalars (the CAM kind's explanation quality, " +
            "the training-health kind's dead channels, update ratios and probe accuracy).",
        ),
      );
      this.charts = [];
      return;
    }
    const group = Trends.pickGroup(groups, selection);
    const list = select(groups.map((g) => [g.key, `${g.kind} · ${g.layer}`]), group.key, (key) => this.onGroup(key), "Metrics of");
    const variants = this.variantSelects(group, selection);
    this.head.replaceChildren(
      el("h2", {className: "cv-card-title", text: "Trends"}),
      field("Metrics of", list),
      ...variants.map(({label, control}) => field(label, control)),
    );
    const chosen = new Map(variants.map(({key, control}) => [key, control.value]));
    const shown = group.series.filter((series) => [...chosen].every(([key, value]) => {
      const own = series.variant[key];
      return own === undefined ? key !== "image" || value === "" : own === value;
    }));
    const runs = selection.runs;
    const steps = shown.flatMap((s) => s.runs.filter((r) => runs.includes(r.run)).flatMap((r) => r.steps));
    const stepRange = steps.length ? [Math.min(...steps), Math.max(...steps)] : [0, 0];
    this.subtitle.textContent =
      `${shown.length} chart${shown.length === 1 ? "" : "s"} of ${group.kind} · ${group.layer}, ` +
      "one line per run · hover for values, click a point to show its step";
    const title = (series) =>
      [series.metric, ...Object.entries(series.variant).filter(([key]) => !chosen.has(key)).map(([, v]) => v)].join(" · ");
    this.charts = shown.map(
      (series) =>
        new Chart(series, {runs, colorOf: this.colorOf, stepRange, onPickStep: this.onPickStep, tooltip: this.tooltip, title: title(series)}),
    );
    this.body.replaceChildren(...this.charts.map((c) => c.element));
    this.mark(this.step);
  }

  /** Shows that /metrics could not be read, with a retry button (the pictures above stay). */
  showError(error, retry) {
    this.tooltip.hide();
    this.charts = [];
    this.subtitle.textContent = "";
    this.body.replaceChildren(errorView("Could not load the metrics", error, retry));
  }

  /** Shows a spinner until the first answer. */
  showLoading(view) {
    this.body.replaceChildren(view);
  }

  /** Marks `step` on every chart. */
  mark(step) {
    this.step = step;
    for (const chart of this.charts) chart.mark(step);
  }
}
