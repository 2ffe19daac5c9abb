// "CNN Vis" tab of TensorBoard: the cnnvis images of every run (rows) at every logged step
// (columns), for one kind / layer / view, plus a filmstrip of one run and the model's layer table.
//
// TensorBoard loads this module in an iframe whose <base href> is /data/plugin/cnnvis/ and calls
// render(). Only plain DOM: no framework, no inline script, no eval (TensorBoard's CSP forbids them).

import {getJson, imageUrl} from "./static/api.js";
import {el, field, select} from "./static/dom.js";
import {Lightbox} from "./static/lightbox.js";
import {SIZE, readState, saveState} from "./static/state.js";
import {Filmstrip, LazyImages, StepGrid, runLabel, textSummary} from "./static/views.js";

const KIND_LABELS = {
  gradcam: "Grad-CAM",
  features: "Feature maps",
  kernels: "Kernels",
  actmax: "Activation max.",
  saliency: "Saliency",
};
/** TensorBoard's categorical run colours, in the order runs are listed. */
const RUN_COLORS = ["#ff7043", "#0077bb", "#cc3311", "#33bbee", "#ee3377", "#009988", "#bbbbbb"];
/** TensorBoard's own reload period. */
const REFRESH_MS = 30_000;
/** Largest and smallest width / height ratio of a cell; beyond them images are letterboxed. */
const MAX_RATIO = 8;
/** Lowest cell height, so that a run's name still fits beside its row. */
const MIN_CELL_HEIGHT = 24;
const SNIPPET = 'vis = VisLogger(model, "runs/exp", probe=probe_images)\nvis.step(step)';

/** Entry point called by TensorBoard. */
export async function render() {
  await addStylesheet("./static/style.css");
  followTensorBoardTheme();
  await new App(document.body).start();
}

function addStylesheet(href) {
  return new Promise((resolve) => {
    const link = el("link", {props: {rel: "stylesheet", href}});
    link.addEventListener("load", resolve);
    link.addEventListener("error", resolve);
    document.head.append(link);
  });
}

/** Mirrors TensorBoard's light / dark theme (its <body class="dark-mode">) in this frame. */
function followTensorBoardTheme() {
  let hostBody = null;
  try {
    hostBody = window.parent === window ? null : window.parent.document.body;
  } catch {
    return; // not inside TensorBoard's page: keep the light theme
  }
  if (!hostBody) return;
  const apply = () => document.documentElement.classList.toggle("cv-dark", hostBody.classList.contains("dark-mode"));
  apply();
  new MutationObserver(apply).observe(hostBody, {attributes: true, attributeFilter: ["class"]});
}

function viewLabel(view) {
  return view.probe === null ? view.view : `probe image ${view.probe}`;
}

/** Index of the value of `sorted` nearest to `value`. */
function nearestIndex(sorted, value) {
  let best = 0;
  sorted.forEach((candidate, i) => {
    if (Math.abs(candidate - value) < Math.abs(sorted[best] - value)) best = i;
  });
  return best;
}

class App {
  constructor(host) {
    this.root = el("div", {className: "cv-app"});
    host.append(this.root);
    this.state = readState();
    this.lazy = new LazyImages();
    this.lightbox = new Lightbox();
    this.index = null;
    this.indexJson = "";
    this.stepsJson = "";
    this.stepsByRun = new Map();
    this.columns = [];
    this.stepsRequest = 0;
    this.layerTables = new Map();
    this.imageRatio = 1;
    this.setSize(this.state.size);
  }

  async start() {
    this.root.replaceChildren(loadingView("Loading cnnvis data…"));
    await this.reload({initial: true});
    setInterval(() => this.reload({initial: false}), REFRESH_MS);
  }

  /** Fetches the index (and the current tag's steps) again; re-renders only what changed. */
  async reload({initial}) {
    if (!initial && (document.hidden || this.lightbox.isOpen)) return;
    let index;
    try {
      index = await getJson("index");
    } catch (error) {
      if (initial || !this.index) {
        this.root.replaceChildren(errorView("Could not load cnnvis data", error, () => this.reload({initial: true})));
      } else {
        this.setStatus(`Could not refresh: ${error.message}`);
      }
      return;
    }
    this.setStatus("");
    const json = JSON.stringify(index);
    if (json !== this.indexJson) {
      this.indexJson = json;
      this.setIndex(index);
    } else if (this.index.runs.length) {
      await this.loadSteps({refresh: true});
    }
  }

  setIndex(index) {
    this.index = index;
    if (!index.runs.length) {
      this.root.replaceChildren(emptyView());
      return;
    }
    this.resolveSelection();
    this.main = el("main", {className: "cv-main"});
    this.root.replaceChildren(this.buildBar(), this.main);
    this.syncControls();
    this.stepsJson = "";
    this.loadSteps({refresh: false});
  }

  /** Replaces selection hints that the data does not hold (first kind, layer, view). */
  resolveSelection() {
    const s = this.state;
    const kind = this.index.kinds.find((k) => k.kind === s.kind) ?? this.index.kinds[0];
    const layer = kind.layers.find((l) => l.layer === s.layer) ?? kind.layers[0];
    const view = layer.views.find((v) => v.view === s.view) ?? layer.views[0];
    Object.assign(s, {kind: kind.kind, layer: layer.layer, view: view.view});
    this.current = {kind, layer, view};
  }

  colorOf(run) {
    return RUN_COLORS[Math.max(0, this.index.runs.indexOf(run)) % RUN_COLORS.length];
  }

  describe(step) {
    const {kind, layer, view} = this.current;
    return `${KIND_LABELS[kind.kind] ?? kind.kind} · ${layer.layer} · ${viewLabel(view)} · step ${step}`;
  }

  // Controls bar.

  buildBar() {
    this.kindButtons = new Map(
      this.index.kinds.map(({kind}) => [
        kind,
        el("button", {
          text: KIND_LABELS[kind] ?? kind,
          attrs: {type: "button", "data-kind": kind},
          on: {click: () => this.select({kind})},
        }),
      ]),
    );
    this.layerSelect = select([], "", (layer) => this.select({layer}), "Layer");
    this.viewSelect = select([], "", (view) => this.select({view}), "Image");
    this.sizeInput = el("input", {
      props: {type: "range", min: SIZE.min, max: SIZE.max, step: SIZE.step, value: this.state.size},
      attrs: {"aria-label": "Image size"},
      on: {input: () => this.setSize(Number(this.sizeInput.value), {save: true})},
    });
    this.stepSlider = el("input", {
      className: "cv-step-slider",
      props: {type: "range", min: 0, step: 1},
      attrs: {"aria-label": "Step"},
      on: {input: () => this.setStepIndex(Number(this.stepSlider.value))},
    });
    this.stepInput = el("input", {
      className: "cv-step-input",
      props: {type: "number", min: 0, step: 1},
      attrs: {"aria-label": "Exact step"},
      on: {change: () => this.pickStep(this.stepInput.value)},
    });
    this.prevButton = iconButton("‹", "Previous logged step", () => this.setStepIndex(this.stepIndex - 1));
    this.nextButton = iconButton("›", "Next logged step", () => this.setStepIndex(this.stepIndex + 1));
    this.stepInfo = el("span", {className: "cv-step-info"});
    this.status = el("span", {className: "cv-status", attrs: {role: "status", "aria-live": "polite"}});
    this.runChips = new Map(
      this.index.runs.map((run) => {
        const box = el("input", {
          props: {type: "checkbox", checked: !this.state.hidden.has(run)},
          on: {change: () => this.toggleRun(run, box.checked)},
        });
        return [run, {box, chip: el("label", {className: "cv-chip"}, [box, runLabel(run, this.colorOf(run))])}];
      }),
    );
    return el("header", {className: "cv-bar"}, [
      el("div", {className: "cv-bar-row"}, [
        el("div", {className: "cv-field"}, [
          el("span", {className: "cv-label", text: "Kind"}),
          el("div", {className: "cv-segmented", attrs: {role: "group", "aria-label": "Kind"}}, [
            ...this.kindButtons.values(),
          ]),
        ]),
        field("Layer", this.layerSelect),
        field("Image", this.viewSelect),
        field("Size", this.sizeInput, "cv-size"),
        el("span", {className: "cv-spacer"}),
        this.status,
        iconButton("↻", "Reload data", () => this.reload({initial: false})),
      ]),
      el("div", {className: "cv-bar-row"}, [
        el("span", {className: "cv-label", text: "Step"}),
        this.prevButton,
        this.stepSlider,
        this.nextButton,
        this.stepInput,
        this.stepInfo,
      ]),
      el("div", {className: "cv-bar-row cv-runs", attrs: {role: "group", "aria-label": "Runs"}}, [
        el("span", {className: "cv-label", text: "Runs"}),
        ...[...this.runChips.values()].map(({chip}) => chip),
        el("button", {className: "cv-link", text: "all", attrs: {type: "button"}, on: {click: () => this.showRuns(true)}}),
        el("button", {className: "cv-link", text: "none", attrs: {type: "button"}, on: {click: () => this.showRuns(false)}}),
      ]),
    ]);
  }

  /** Brings the kind buttons, the layer / view lists and the run chips in line with the state. */
  syncControls() {
    const {kind, layer, view} = this.current;
    for (const [name, button] of this.kindButtons) button.setAttribute("aria-pressed", String(name === kind.kind));
    replaceOptions(this.layerSelect, kind.layers.map((l) => [l.layer, l.layer]), layer.layer);
    replaceOptions(this.viewSelect, layer.views.map((v) => [v.view, viewLabel(v)]), view.view);
    const withData = new Set(view.runs);
    for (const [run, {box, chip}] of this.runChips) {
      box.checked = !this.state.hidden.has(run);
      chip.classList.toggle("cv-no-data", !withData.has(run));
      chip.title = withData.has(run) ? run : `${run} logged no image for this selection`;
    }
  }

  select(change) {
    Object.assign(this.state, change);
    this.resolveSelection();
    this.syncControls();
    saveState(this.state);
    this.loadSteps({refresh: false});
  }

  toggleRun(run, shown) {
    if (shown) this.state.hidden.delete(run);
    else this.state.hidden.add(run);
    saveState(this.state);
    this.renderViews();
  }

  showRuns(shown) {
    this.state.hidden = shown ? new Set() : new Set(this.index.runs);
    for (const {box} of this.runChips.values()) box.checked = shown;
    saveState(this.state);
    this.renderViews();
  }

  setSize(size, {save = false} = {}) {
    this.state.size = size;
    this.applyCellBox();
    if (save) saveState(this.state);
  }

  /**
   * Sizes every image cell for the current tag: the "size" is the side of a square of the same area,
   * so wide panels and tall kernel grids get the space a square image would.
   */
  applyCellBox() {
    const ratio = Math.min(MAX_RATIO, Math.max(1 / MAX_RATIO, this.imageRatio));
    const height = Math.max(MIN_CELL_HEIGHT, Math.round(this.state.size / Math.sqrt(ratio)));
    this.cellWidth = Math.round(height * ratio);
    const style = document.documentElement.style;
    style.setProperty("--cv-w", `${this.cellWidth}px`);
    style.setProperty("--cv-h", `${height}px`);
    this.grid?.setCellWidth(this.cellWidth);
  }

  setStatus(text) {
    if (this.status) this.status.textContent = text;
  }

  // Steps and views.

  async loadSteps({refresh}) {
    const tag = this.current.view.tag;
    const request = ++this.stepsRequest;
    if (!refresh && this.main.childElementCount) this.main.classList.add("cv-busy");
    else if (!refresh) this.main.replaceChildren(loadingView("Loading steps…"));
    let answer;
    try {
      answer = await getJson("steps", {tag});
    } catch (error) {
      if (request === this.stepsRequest) {
        this.main.classList.remove("cv-busy");
        this.main.replaceChildren(errorView("Could not load the steps", error, () => this.loadSteps({refresh: false})));
      }
      return;
    }
    const json = JSON.stringify(answer);
    if (request !== this.stepsRequest || (refresh && json === this.stepsJson)) return;
    this.stepsJson = json;
    this.stepsByRun = new Map(answer.runs.map(({run, steps}) => [run, steps]));
    this.imageRatio = answer.width && answer.height ? answer.width / answer.height : 1;
    this.renderViews();
  }

  renderViews() {
    this.main.classList.remove("cv-busy");
    const runs = this.index.runs.filter((run) => this.stepsByRun.has(run) && !this.state.hidden.has(run));
    this.lazy.reset();
    this.columns = [...new Set(runs.flatMap((run) => this.stepsByRun.get(run)))].sort((a, b) => a - b);
    if (!runs.length) {
      this.grid = this.film = null;
      this.applyCellBox();
      this.syncStepControls();
      const reason = this.stepsByRun.size ? "Every run is hidden: tick a run above." : "No run logged this image.";
      this.main.replaceChildren(el("p", {className: "cv-card cv-notice", text: reason}));
      return;
    }
    const tag = this.current.view.tag;
    const describe = (step) => this.describe(step);
    const onOpen = (run, step) => this.openLightbox(run, step);
    this.grid = new StepGrid({
      tag,
      runs,
      columns: this.columns,
      stepsByRun: this.stepsByRun,
      colorOf: (run) => this.colorOf(run),
      lazy: this.lazy,
      describe,
      onOpen,
      onPickStep: (column) => this.setStepIndex(column),
    });
    const filmRun = runs.includes(this.state.film) ? this.state.film : runs[0];
    this.film = new Filmstrip({tag, run: filmRun, steps: this.stepsByRun.get(filmRun), lazy: this.lazy, describe, onOpen});
    const missing = this.index.runs.filter((run) => !this.stepsByRun.has(run) && !this.state.hidden.has(run));
    const {kind, layer, view} = this.current;
    this.main.replaceChildren(
      el("section", {className: "cv-card"}, [
        el("h2", {className: "cv-card-title", text: `${KIND_LABELS[kind.kind] ?? kind.kind} · ${layer.layer} · ${viewLabel(view)}`}),
        el("p", {
          className: "cv-card-subtitle",
          text: `${runs.length} run${runs.length === 1 ? "" : "s"} × ${this.columns.length} logged step${this.columns.length === 1 ? "" : "s"} · click an image to enlarge`,
        }),
        this.grid.element,
        missing.length ? el("p", {className: "cv-note", text: `Not logged by: ${missing.join(", ")}`}) : null,
      ]),
      el("section", {className: "cv-card"}, [
        el("div", {className: "cv-card-head"}, [
          el("h2", {className: "cv-card-title", text: "Filmstrip"}),
          select(runs.map((run) => [run, run]), filmRun, (film) => this.selectFilmRun(film), "Filmstrip run"),
        ]),
        el("p", {className: "cv-card-subtitle", text: `Every logged step of ${filmRun}`}),
        this.film.element,
      ]),
      this.layerTableCard(runs[0]),
    );
    this.applyCellBox();
    this.syncStepControls();
    const wanted = this.state.step ?? this.columns[this.columns.length - 1];
    this.setStepIndex(nearestIndex(this.columns, wanted), {scroll: true, save: false});
  }

  selectFilmRun(run) {
    this.state.film = run;
    saveState(this.state);
    this.renderViews();
  }

  syncStepControls() {
    const count = this.columns.length;
    this.stepSlider.max = String(Math.max(0, count - 1));
    this.stepSlider.disabled = count < 2;
    this.stepInput.disabled = count === 0;
    this.stepInput.min = String(this.columns[0] ?? 0);
    this.stepInput.max = String(this.columns[count - 1] ?? 0);
  }

  /** Selects column `index` (clamped); the last column is stored as "latest" (no step in the URL). */
  setStepIndex(index, {scroll = true, save = true} = {}) {
    const count = this.columns.length;
    if (!count) return;
    this.stepIndex = Math.min(count - 1, Math.max(0, index));
    const step = this.columns[this.stepIndex];
    this.state.step = this.stepIndex === count - 1 ? null : step;
    this.stepSlider.value = String(this.stepIndex);
    this.stepInput.value = String(step);
    this.stepInfo.textContent = `${this.stepIndex + 1} of ${count} logged steps`;
    this.prevButton.disabled = this.stepIndex === 0;
    this.nextButton.disabled = this.stepIndex === count - 1;
    this.grid?.setStep(this.stepIndex, {scroll});
    this.film?.setStep(step);
    if (save) saveState(this.state);
  }

  /** Jumps to the logged step nearest to a typed one. */
  pickStep(text) {
    const step = Number(text);
    if (text === "" || !Number.isFinite(step)) {
      this.stepInput.value = String(this.columns[this.stepIndex] ?? "");
      return;
    }
    this.setStepIndex(nearestIndex(this.columns, step));
  }

  openLightbox(run, step) {
    const tag = this.current.view.tag;
    const steps = this.stepsByRun.get(run) ?? [];
    const items = steps.map((s) => ({src: imageUrl(run, tag, s), run, color: this.colorOf(run), details: this.describe(s)}));
    this.lightbox.open(items, Math.max(0, steps.indexOf(step)));
  }

  /** A folded card with the text summaries of `run` (the layer table first), fetched when first opened. */
  layerTableCard(run) {
    const body = el("div", {className: "cv-layer-table"});
    const card = el("details", {className: "cv-card cv-layers"}, [
      el("summary", {className: "cv-card-title", text: `Layer table · ${run}`}),
      body,
    ]);
    card.addEventListener("toggle", async () => {
      if (!card.open || body.childElementCount) return;
      body.append(loadingView("Loading…"));
      if (!this.layerTables.has(run)) this.layerTables.set(run, getJson("text", {run}));
      try {
        const {texts} = await this.layerTables.get(run);
        const modelFirst = [...texts].sort((a, b) => summaryName(b.tag).startsWith("model/") - summaryName(a.tag).startsWith("model/"));
        body.replaceChildren(
          ...(modelFirst.length
            ? modelFirst.map(({tag, step, text}) =>
                el("figure", {}, [el("figcaption", {text: `${summaryName(tag)} · step ${step}`}), textSummary(text)]),
              )
            : [el("p", {className: "cv-note", text: "This run logged no text summary."})]),
        );
      } catch (error) {
        this.layerTables.delete(run);
        body.replaceChildren(el("p", {className: "cv-error-text", text: error.message}));
      }
    });
    return card;
  }
}

/** "cnnvis/summary/model/layers/text_summary" -> "model/layers". */
function summaryName(tag) {
  return tag.replace(/^cnnvis\/summary\//, "").replace(/\/text_summary$/, "");
}

function iconButton(text, label, onClick) {
  return el("button", {className: "cv-icon-button", text, attrs: {type: "button", "aria-label": label, title: label}, on: {click: onClick}});
}

function replaceOptions(node, options, value) {
  node.replaceChildren(...options.map(([optionValue, label]) => el("option", {text: label, props: {value: optionValue}})));
  node.value = value;
}

function loadingView(text) {
  return el("div", {className: "cv-loading-view", attrs: {role: "status"}}, [el("span", {className: "cv-spinner"}), el("span", {text})]);
}

function emptyView() {
  return el("section", {className: "cv-card cv-message"}, [
    el("h2", {text: "No cnnvis data: add VisLogger to your training loop"}),
    el("pre", {className: "cv-code", text: SNIPPET}),
    el("p", {
      text: "Then start TensorBoard on the folder holding the runs (tensorboard --logdir runs). This tab checks for new data every 30 seconds.",
    }),
  ]);
}

function errorView(title, error, retry) {
  return el("section", {className: "cv-card cv-message cv-error", attrs: {role: "alert"}}, [
    el("h2", {text: title}),
    el("p", {className: "cv-error-text", text: error.message}),
    el("button", {className: "cv-button", text: "Retry", attrs: {type: "button"}, on: {click: retry}}),
  ]);
}
