// The tab: fetches /index, /steps and /metrics, keeps the selection, and lays out the controls bar, the
// runs × steps grid, the trends charts, the filmstrip and the layer table. Kinds, their labels and their order are the
// backend's (/index reads them from the runs' kinds tables), so a user's own kind shows up as is.

import {getJson, imageUrl} from "./api.js";
import {Controls, viewLabel} from "./controls.js";
import {el, select} from "./dom.js";
import {Lightbox} from "./lightbox.js";
import {emptyView, errorView, loadingView} from "./messages.js";
import {readState, saveState} from "./state.js";
import {Trends} from "./trends.js";
import {Filmstrip, LazyImages, StepGrid, panelCaption, textSummary, thumb} from "./views.js";

/** TensorBoard's categorical run colours, in the order runs are listed. */
const RUN_COLORS = ["#ff7043", "#0077bb", "#cc3311", "#33bbee", "#ee3377", "#009988", "#bbbbbb"];
/** TensorBoard's own reload period. */
const REFRESH_MS = 30_000;
/** Largest and smallest width / height ratio of a cell; beyond them images are letterboxed. */
const MAX_RATIO = 8;
/** Lowest cell height, so that a run's name still fits beside its row. */
const MIN_CELL_HEIGHT = 24;
/** Height of one caption line under a panel shown alone, and the room around the lines. */
const CAPTION_LINE = 15;
const CAPTION_PAD = 4;
/** Longest side of a panel in the side-by-side card. */
const COMPARE_SIZE = 200;

/** Index of the value of `sorted` nearest to `value`. */
function nearestIndex(sorted, value) {
  let best = 0;
  sorted.forEach((candidate, i) => {
    if (Math.abs(candidate - value) < Math.abs(sorted[best] - value)) best = i;
  });
  return best;
}

/** The layer logged by the most runs (any of its views), the first of those in the index's order: with several
 * runs, the first screen shows the layer they share rather than one only a single run has. */
function mostLogged(layers) {
  const runs = (layer) => new Set(layer.views.flatMap((v) => v.runs)).size;
  return layers.reduce((best, layer) => (runs(layer) > runs(best) ? layer : best), layers[0]);
}

/** "cnnvis/summary/model/layers/text_summary" -> "model/layers". */
function summaryName(tag) {
  return tag.replace(/^cnnvis\/summary\//, "").replace(/\/text_summary$/, "");
}

/** Where a text summary goes in the layer-table card: the layer table, then the other model-wide texts, then the rest. */
function summaryRank(tag) {
  const name = summaryName(tag);
  return name === "model/layers" ? 0 : name.startsWith("model/") ? 1 : 2;
}

export class App {
  /** Builds the tab inside `host` (the frame's <body>); `start()` loads the data. */
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
    this.stepsTag = null; // the tag whose steps the grid shows (`columns`)
    this.layerTables = new Map();
    this.imageRatio = 1;
    this.pictureRatio = 1; // of the whole pictures of the current tag
    this.panels = new Map(); // run -> step -> panel records of the current tag (/panels)
    this.panelLabels = new Map(); // key -> label of every panel in `panels`, in the order they come
    this.compare = null;
    this.controls = null;
    this.metrics = null; // the /metrics answer
    this.metricsJson = "";
    this.metricsRequest = 0;
    this.trends = new Trends({
      colorOf: (run) => this.colorOf(run),
      onPickStep: (step) => this.setStepIndex(nearestIndex(this.columns, step)),
      onGroup: (key) => this.selectMetrics(key),
    });
    // The grid's row of step numbers sticks just below the controls bar, whose height varies (it wraps).
    this.barObserver = new ResizeObserver(() => {
      const height = this.controls?.element.getBoundingClientRect().height ?? 0;
      document.documentElement.style.setProperty("--cv-bar-height", `${Math.floor(height)}px`);
    });
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
      await Promise.all([this.loadSteps({refresh: true}), this.loadMetrics()]);
    }
  }

  /** Fetches /metrics; redraws the trends when the answer changed. */
  async loadMetrics() {
    const request = ++this.metricsRequest;
    if (!this.metrics) this.trends.showLoading(loadingView("Loading metrics…"));
    let answer;
    try {
      answer = await getJson("metrics");
    } catch (error) {
      if (request === this.metricsRequest && !this.metrics) this.trends.showError(error, () => this.loadMetrics());
      return;
    }
    const json = JSON.stringify(answer);
    if (request !== this.metricsRequest || json === this.metricsJson) return;
    this.metricsJson = json;
    this.metrics = answer;
    this.renderTrends();
  }

  /** Redraws the trends for the shown runs and the grid's kind and layer. */
  renderTrends() {
    if (!this.metrics || !this.current) return;
    this.trends.update(this.metrics, {
      runs: this.metrics.runs.filter((run) => !this.state.hidden.has(run)),
      wanted: this.state.metrics,
      kind: this.current.kind.kind,
      layer: this.current.layer.layer,
    });
  }

  selectMetrics(key) {
    this.state.metrics = key;
    saveState(this.state);
    this.renderTrends();
  }

  setIndex(index) {
    this.index = index;
    if (!index.runs.length) {
      this.controls = null;
      this.root.replaceChildren(emptyView());
      return;
    }
    this.resolveSelection();
    this.main = el("main", {className: "cv-main"});
    this.controls = new Controls({
      kinds: index.kinds,
      runs: index.runs,
      state: this.state,
      colorOf: (run) => this.colorOf(run),
      on: {
        select: (change) => this.select(change),
        size: (size) => this.setSize(size, {save: true}),
        step: (column) => this.setStepIndex(column),
        stepBy: (delta) => this.setStepIndex(this.stepIndex + delta),
        pickStep: (text) => this.pickStep(text),
        toggleRun: (run, shown) => this.toggleRun(run, shown),
        showRuns: (shown) => this.showRuns(shown),
        reload: () => this.reload({initial: false}),
        panel: (panel) => this.selectPanel(panel),
      },
    });
    this.root.replaceChildren(this.controls.element, this.main);
    this.barObserver.disconnect();
    this.barObserver.observe(this.controls.element);
    this.controls.sync(this.current, this.state.hidden);
    this.stepsJson = "";
    this.loadSteps({refresh: false});
    this.loadMetrics();
  }

  /** Replaces selection hints that the data does not hold (first kind, the layer most runs logged, first view). */
  resolveSelection() {
    const s = this.state;
    const kind = this.index.kinds.find((k) => k.kind === s.kind) ?? this.index.kinds[0];
    const layer = kind.layers.find((l) => l.layer === s.layer) ?? mostLogged(kind.layers);
    const view = layer.views.find((v) => v.view === s.view) ?? layer.views[0];
    Object.assign(s, {kind: kind.kind, layer: layer.layer, view: view.view});
    this.current = {kind, layer, view};
  }

  colorOf(run) {
    return RUN_COLORS[Math.max(0, this.index.runs.indexOf(run)) % RUN_COLORS.length];
  }

  /** "<kind label> · <layer> · <view>": what the current selection shows, the kind named by its label. */
  title() {
    const {kind, layer, view} = this.current;
    const key = this.panelKey();
    const panel = key ? ` · ${this.panelLabels.get(key)}` : "";
    return `${kind.label} · ${layer.layer} · ${viewLabel(view)}${panel}`;
  }

  describe(step) {
    return `${this.title()} · step ${step}`;
  }

  /** Fetches the panel records of `tag` for `runs`; a run whose records cannot be read shows whole pictures. */
  async loadPanels(tag, runs) {
    const answers = await Promise.all(runs.map((run) => getJson("panels", {run, tag}).catch(() => null)));
    const panels = new Map();
    answers.forEach((answer, i) => {
      if (answer && Object.keys(answer.steps).length) {
        panels.set(runs[i], new Map(Object.entries(answer.steps).map(([step, records]) => [Number(step), records])));
      }
    });
    if (answers.some((answer) => answer === null)) this.setStatus("Could not read the captions of some runs");
    return panels;
  }

  /** Keeps the panel records of the current tag and the list of their panels (read once per answer, not per cell). */
  setPanelRecords(panels) {
    this.panels = panels;
    this.panelLabels = new Map();
    for (const steps of panels.values()) {
      for (const records of steps.values()) {
        for (const r of records) if (!this.panelLabels.has(r.key)) this.panelLabels.set(r.key, r.label);
      }
    }
  }

  /** The key of the panel shown alone, or null for whole pictures (also when the pictures have no such panel). */
  panelKey() {
    const key = this.state.panel;
    return key && this.panelLabels.has(key) ? key : null;
  }

  /** The record of the chosen panel in `run`'s picture at `step`, or null. */
  panelOf(run, step, key = this.panelKey()) {
    if (!key) return null;
    return this.panels.get(run)?.get(step)?.find((r) => r.key === key) ?? null;
  }

  /** Cell ratio and caption room for the chosen panel (or the whole pictures). */
  applyPanelShape() {
    const key = this.panelKey();
    const records = key ? [...this.panels.values()].flatMap((steps) => [...steps.values()].flat()).filter((r) => r.key === key) : [];
    if (records.length) {
      const [, , w, h] = records[0].box;
      this.imageRatio = w && h ? w / h : 1;
      const lines = Math.max(...records.map((r) => r.text.length));
      this.captionHeight = lines ? lines * CAPTION_LINE + CAPTION_PAD : 0;
    } else {
      this.imageRatio = this.pictureRatio;
      this.captionHeight = 0;
    }
    document.documentElement.style.setProperty("--cv-cap", `${this.captionHeight}px`);
  }

  selectPanel(panel) {
    this.state.panel = panel;
    saveState(this.state);
    this.renderViews();
  }

  select(change) {
    Object.assign(this.state, change);
    if ("kind" in change || "layer" in change) this.state.metrics = null; // the trends follow the grid again
    this.resolveSelection();
    this.controls.sync(this.current, this.state.hidden);
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
    this.controls.checkRuns(shown);
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
    this.controls?.setStatus(text);
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
    const panels = await this.loadPanels(tag, answer.runs.map(({run}) => run));
    if (request !== this.stepsRequest) return;
    this.stepsJson = json;
    this.stepsTag = tag;
    this.stepsByRun = new Map(answer.runs.map(({run, steps}) => [run, steps]));
    this.pictureRatio = answer.width && answer.height ? answer.width / answer.height : 1;
    this.setPanelRecords(panels);
    this.renderViews();
  }

  renderViews() {
    this.main.classList.remove("cv-busy");
    this.controls.setPanels([...this.panelLabels], this.panelKey());
    this.applyPanelShape();
    const runs = this.index.runs.filter((run) => this.stepsByRun.has(run) && !this.state.hidden.has(run));
    this.lazy.reset();
    this.columns = [...new Set(runs.flatMap((run) => this.stepsByRun.get(run)))].sort((a, b) => a - b);
    if (!runs.length) {
      this.grid = this.film = null;
      this.applyCellBox();
      this.controls.syncSteps(this.columns);
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
      panelOf: (run, step) => this.panelOf(run, step),
    });
    const filmRun = runs.includes(this.state.film) ? this.state.film : runs[0];
    this.film = new Filmstrip({
      tag,
      run: filmRun,
      steps: this.stepsByRun.get(filmRun),
      lazy: this.lazy,
      describe,
      onOpen,
      panelOf: (run, step) => this.panelOf(run, step),
    });
    this.compare = this.panels.size ? this.compareCard(tag, filmRun) : null;
    const missing = this.index.runs.filter((run) => !this.stepsByRun.has(run) && !this.state.hidden.has(run));
    this.main.replaceChildren(
      el("section", {className: "cv-card"}, [
        el("h2", {className: "cv-card-title", text: this.title()}),
        el("p", {
          className: "cv-card-subtitle",
          text: `${runs.length} run${runs.length === 1 ? "" : "s"} × ${this.columns.length} logged step${this.columns.length === 1 ? "" : "s"} · click an image to enlarge`,
        }),
        this.grid.element,
        missing.length ? el("p", {className: "cv-note", text: `Not logged by: ${missing.join(", ")}`}) : null,
      ]),
      this.trends.element,
      el("section", {className: "cv-card"}, [
        el("div", {className: "cv-card-head"}, [
          el("h2", {className: "cv-card-title", text: "Filmstrip"}),
          select(runs.map((run) => [run, run]), filmRun, (film) => this.selectFilmRun(film), "Filmstrip run"),
        ]),
        el("p", {className: "cv-card-subtitle", text: `Every logged step of ${filmRun}`}),
        this.film.element,
      ]),
      this.compare?.element,
      this.layerTableCard(runs[0]),
    );
    this.renderTrends();
    this.applyCellBox();
    this.controls.syncSteps(this.columns);
    const wanted = this.state.step ?? this.columns[this.columns.length - 1];
    this.setStepIndex(nearestIndex(this.columns, wanted), {scroll: true, save: false});
  }

  /**
   * The side-by-side card: every panel of one run's picture at the current step, each alone and large, with its
   * caption as text (one probe image, one step, every logged method or channel). Follows the filmstrip's run.
   */
  compareCard(tag, run) {
    const body = el("div", {className: "cv-compare"});
    const subtitle = el("p", {className: "cv-card-subtitle"});
    // Folded until opened (its open state is kept in the URL): its large images load only when wanted.
    const element = el("details", {className: "cv-card cv-compare-card", props: {open: this.state.compare === "open"}}, [
      el("summary", {className: "cv-card-title", text: "Panels side by side"}),
      subtitle,
      body,
    ]);
    let shownStep = null;
    element.addEventListener("toggle", () => {
      this.state.compare = element.open ? "open" : null;
      saveState(this.state);
      if (element.open && shownStep !== null) setStep(shownStep);
    });
    const setStep = (step) => {
      shownStep = step;
      if (!element.open) return;
      const records = this.panels.get(run)?.get(step) ?? [];
      subtitle.textContent = records.length
        ? `${run} · ${this.title()} · step ${step} · every panel of the picture, with its caption`
        : `${run} logged no captioned picture at step ${step}`;
      body.replaceChildren(
        ...records.map((panel) => {
          const [, , w, h] = panel.box;
          const scale = COMPARE_SIZE / Math.max(w, h, 1);
          const slot = thumb(this.lazy, {run, tag, step, label: `${run}, ${this.describe(step)}`, panel});
          const figure = el("figure", {className: "cv-compare-panel", attrs: {"data-panel": panel.key}}, [
            slot,
            el("figcaption", {className: "cv-compare-label", text: panel.label}),
            // the label already says what the first line says (a method label over its own name)
            panelCaption({...panel, text: panel.text.filter((line, i) => i > 0 || !panel.label.startsWith(line))}),
          ]);
          figure.style.setProperty("--cv-w", `${Math.round(w * scale)}px`);
          figure.style.setProperty("--cv-h", `${Math.round(h * scale)}px`);
          slot.addEventListener("click", () => this.openLightbox(run, step));
          return figure;
        }),
      );
    };
    return {element, setStep};
  }

  selectFilmRun(run) {
    this.state.film = run;
    saveState(this.state);
    this.renderViews();
  }

  /** Selects column `index` (clamped); the last column is stored as "latest" (no step in the URL). */
  setStepIndex(index, {scroll = true, save = true} = {}) {
    const count = this.columns.length;
    if (!count) return;
    this.stepIndex = Math.min(count - 1, Math.max(0, index));
    const step = this.columns[this.stepIndex];
    this.state.step = this.stepIndex === count - 1 ? null : step;
    this.controls.showStep(this.stepIndex, this.columns);
    this.grid?.setStep(this.stepIndex, {scroll});
    this.film?.setStep(step);
    this.compare?.setStep(step);
    this.trends.mark(step);
    if (save) saveState(this.state);
  }

  /**
   * Jumps to the logged step nearest to a typed one. While the steps of a new selection are still loading,
   * the grid's columns are another image's: the typed step is kept as the wanted one and `renderViews`
   * resolves it against the new steps once they arrive.
   */
  pickStep(text) {
    const step = Number(text);
    if (text === "" || !Number.isFinite(step)) {
      this.controls.resetStepInput(this.columns[this.stepIndex]);
      return;
    }
    if (this.stepsTag !== this.current.view.tag) {
      this.state.step = step;
      saveState(this.state);
      return;
    }
    this.setStepIndex(nearestIndex(this.columns, step));
  }

  openLightbox(run, step) {
    const tag = this.current.view.tag;
    const steps = this.stepsByRun.get(run) ?? [];
    const details = (s) => {
      const panel = this.panelOf(run, s);
      return panel ? `${this.describe(s)} · ${panel.label}: ${panel.text.join(" · ")}` : this.describe(s);
    };
    const items = steps.map((s) => ({src: imageUrl(run, tag, s), run, color: this.colorOf(run), details: details(s)}));
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
        const ordered = [...texts].sort((a, b) => summaryRank(a.tag) - summaryRank(b.tag));
        body.replaceChildren(
          ...(ordered.length
            ? ordered.map(({tag, step, text}) =>
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
