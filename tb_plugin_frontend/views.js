// The two picture views of the tab, both lazy: the runs × steps grid and the filmstrip of one run.

import {imageUrl} from "./api.js";
import {el} from "./dom.js";

/** Images up to this many pixels wide and high are drawn with hard pixel edges when enlarged. */
export const PIXELATED_MAX = 256;
/** Share of a slot that must be on screen before its image is requested. */
const VISIBLE_SHARE = 0.01;

/**
 * Requests images only when their slot comes on screen: a slot gets its <img> the first time at
 * least `VISIBLE_SHARE` of it is inside the viewport (clipped by scrolling containers), so the first
 * screen requests exactly the images it shows and the rest follow as the user scrolls.
 */
export class LazyImages {
  constructor() {
    this.pending = new Map();
    this.observer = new IntersectionObserver((entries) => this.reveal(entries), {threshold: VISIBLE_SHARE});
  }

  /** Loads `src` into `slot` once the slot is visible. */
  add(slot, src, alt) {
    this.pending.set(slot, {src, alt});
    this.observer.observe(slot);
  }

  /** Stops watching `slot` (it left the page). */
  forget(slot) {
    if (this.pending.delete(slot)) this.observer.unobserve(slot);
  }

  /** Forgets every slot (their views are being replaced). */
  reset() {
    this.observer.disconnect();
    this.pending.clear();
  }

  reveal(entries) {
    for (const entry of entries) {
      const image = this.pending.get(entry.target);
      if (!image || !entry.isIntersecting || entry.intersectionRatio <= 0) continue;
      this.observer.unobserve(entry.target);
      this.pending.delete(entry.target);
      loadInto(entry.target, image.src, image.alt);
    }
  }
}

function loadInto(slot, src, alt) {
  const image = el("img", {props: {alt, decoding: "async"}});
  slot.classList.add("cv-loading");
  image.addEventListener("load", () => {
    slot.classList.remove("cv-loading");
    if (slot.dataset.crop) {
      // One panel of the picture: the image is scaled so the panel's box fills the slot (see style.css).
      const [x, y, w, h] = slot.dataset.crop.split(",").map(Number);
      const vars = {"--crop-x": x, "--crop-y": y, "--crop-w": w, "--crop-h": h, "--img-w": image.naturalWidth, "--img-h": image.naturalHeight};
      for (const [name, value] of Object.entries(vars)) slot.style.setProperty(name, String(value));
      slot.classList.add("cv-cropped");
    }
    image.classList.toggle(
      "cv-pixelated",
      image.naturalWidth <= PIXELATED_MAX && image.naturalHeight <= PIXELATED_MAX,
    );
  });
  image.addEventListener("error", () => {
    slot.classList.remove("cv-loading");
    slot.classList.add("cv-failed");
    slot.title = `${alt}: the image could not be loaded`;
  });
  image.src = src;
  slot.append(image);
}

/**
 * A clickable image slot (see `onThumbClick`); the image itself arrives through `lazy`. With `panel` (a record
 * of /panels: key, label, box, text) the slot shows that panel of the picture alone.
 */
export function thumb(lazy, {run, tag, step, label, panel = null}) {
  const title = panel ? `${label} · ${panel.label}: ${panel.text.join(" · ")}` : label;
  const slot = el("button", {
    className: "cv-thumb",
    attrs: {type: "button", title: `${title} (click to enlarge)`, "data-run": run, "data-step": step},
  });
  if (panel) {
    slot.dataset.crop = panel.box.join(",");
    slot.dataset.panel = panel.key;
  }
  lazy.add(slot, imageUrl(run, tag, step), panel ? `${label} · ${panel.label}` : label);
  return slot;
}

/** A panel's caption lines as text, under its picture. */
export function panelCaption(panel) {
  return el("div", {className: "cv-caption"}, panel.text.map((line) => el("div", {className: "cv-caption-line", text: line})));
}

/** One listener for all the slots inside `container`: calls `onOpen(run, step)` for the clicked one. */
function onThumbClick(container, onOpen) {
  container.addEventListener("click", (event) => {
    const slot = event.target.closest(".cv-thumb");
    if (slot) onOpen(slot.dataset.run, Number(slot.dataset.step));
  });
}

/** A run's name after a swatch of its colour. */
export function runLabel(run, color) {
  const swatch = el("span", {className: "cv-swatch"});
  swatch.style.setProperty("--run-color", color);
  return el("span", {className: "cv-run", attrs: {title: run}}, [swatch, el("span", {className: "cv-run-name", text: run})]);
}

/** Pixels between two cells of the grid. */
const GAP = 4;
/** Height of the row of step numbers above the grid. */
const HEADER_HEIGHT = 24;
/** Columns kept in the page on each side of the visible ones (their images still load lazily). */
const SPARE_COLUMNS = 2;
/** Room kept between two step numbers, beyond their own padding. */
const LABEL_PADDING = 4;

/**
 * One row per run, one column per logged step, for one tag. A cell is empty when its run did not
 * log that step; the column of the current step is highlighted.
 *
 * Only the columns near the visible part of the horizontally scrolling area exist in the page
 * (runs x 1000 steps would otherwise be tens of thousands of elements), placed by CSS from their
 * column and row numbers. The run labels sit outside the scrolling part, so no image hides behind
 * them and none is requested for nothing. The row of step numbers sits outside it too, above the
 * cells: it follows their horizontal scrolling and stays on screen (under the controls bar) while
 * the page scrolls down a tall grid; a column partly scrolled out keeps its number in its visible
 * part. A column is as wide as its images or as its step number, whichever is wider, so every
 * column shows its step whatever the image size.
 *
 * Scrolling done by the tab (a step chosen, a size change) always puts a column boundary at the
 * left edge, so the leftmost column shown is whole; the track is padded (less than a column) so
 * that this holds at its right end too.
 */
export class StepGrid {
  /**
   * @param {{tag: string, runs: string[], columns: number[], stepsByRun: Map<string, number[]>,
   *          colorOf: function(string): string, lazy: LazyImages, describe: function(number): string,
   *          onOpen: function(string, number), onPickStep: function(number)}} options
   */
  constructor({tag, runs, columns, stepsByRun, colorOf, lazy, describe, onOpen, onPickStep, panelOf = () => null}) {
    Object.assign(this, {tag, runs, columns, lazy, describe, panelOf});
    this.logged = runs.map((run) => new Set(stepsByRun.get(run)));
    this.rendered = new Map(); // column -> its elements
    this.current = -1;
    this.cellWidth = 0; // of the images
    this.columnWidth = 0; // of the columns: the images' or the step numbers', the wider
    this.labelWidth = 0; // of the widest step number, measured once the grid is in the page
    this.frameRequest = null;
    this.track = el("div", {className: "cv-grid"});
    this.track.style.setProperty("--cv-rows", String(runs.length));
    onThumbClick(this.track, onOpen);
    this.steps = el("div", {className: "cv-grid-steps"});
    this.steps.addEventListener("click", (event) => {
      const header = event.target.closest(".cv-step-head");
      if (header) onPickStep(Number(header.dataset.column));
    });
    this.scroller = el("div", {className: "cv-grid-scroll"}, [this.track]);
    this.scroller.addEventListener("scroll", () => this.onScroll(), {passive: true});
    this.resizeObserver = new ResizeObserver(() => this.scheduleRender());
    this.resizeObserver.observe(this.scroller);
    // The step row has no scroll bar of its own; a horizontal wheel or swipe over it scrolls the cells.
    const stepsView = el("div", {className: "cv-grid-steps-view"}, [this.steps]);
    this.stepsView = stepsView;
    stepsView.addEventListener("wheel", (event) => {
      if (event.deltaX) this.scroller.scrollLeft += event.deltaX;
    }, {passive: true});
    // Focusing a step button (Tab) may scroll the step row itself: the cells follow.
    stepsView.addEventListener("scroll", () => {
      if (Math.abs(stepsView.scrollLeft - this.scroller.scrollLeft) >= 1) this.scroller.scrollLeft = stepsView.scrollLeft;
    }, {passive: true});
    const labels = runs.map((run) => {
      const label = el("div", {className: "cv-row-head"}, [runLabel(run, colorOf(run))]);
      label.style.setProperty("--run-color", colorOf(run));
      return label;
    });
    this.element = el("div", {className: "cv-grid-wrap"}, [
      el("div", {className: "cv-grid-head"}, [el("div", {className: "cv-corner", text: "run \\ step"}), stepsView]),
      el("div", {className: "cv-grid-body"}, [el("div", {className: "cv-grid-labels"}, labels), this.scroller]),
    ]);
    this.element.style.setProperty("--cv-gap", `${GAP}px`);
    this.element.style.setProperty("--cv-header", `${HEADER_HEIGHT}px`);
  }

  /** Pixels from one column's left edge to the next one's. */
  get pitch() {
    return this.columnWidth + GAP;
  }

  /**
   * The image width in pixels changed (the size control): sizes the columns, and keeps the current
   * step's column in view.
   */
  setCellWidth(width) {
    if (!this.labelWidth) this.labelWidth = this.measureLabels();
    const columnWidth = Math.max(width, this.labelWidth);
    const changed = columnWidth !== this.columnWidth;
    this.cellWidth = width;
    this.columnWidth = columnWidth;
    this.element.style.setProperty("--cv-col-w", `${columnWidth}px`);
    this.sizeTrack();
    if (changed && this.current >= 0) this.placeColumn(this.current);
    this.renderVisibleColumns();
  }

  /** Width in pixels the widest step number needs in a column header (0 while the grid is not in the page). */
  measureLabels() {
    if (!this.element.isConnected || !this.columns.length) return 0;
    const longest = this.columns.reduce((a, b) => (String(b).length > String(a).length ? b : a));
    const probe = el("span", {className: "cv-step-head cv-step-measure"}, [el("span", {className: "cv-step-label", text: longest})]);
    this.steps.append(probe);
    const width = probe.getBoundingClientRect().width;
    probe.remove();
    return width ? Math.ceil(width) + LABEL_PADDING : 0;
  }

  /** Columns wholly visible at once (at least one). */
  fullColumns() {
    return Math.max(1, Math.floor((this.scroller.clientWidth + GAP) / this.pitch));
  }

  /**
   * Sets the width of the cells and of the step row: every column, plus what lets the last scroll
   * position start on a column boundary.
   */
  sizeTrack() {
    const content = this.columns.length * this.pitch;
    const lastFirst = Math.max(0, this.columns.length - this.fullColumns());
    const width = `${Math.max(content, lastFirst * this.pitch + this.scroller.clientWidth)}px`;
    this.track.style.width = width;
    this.steps.style.width = width;
  }

  /** Highlights column `column` and, when asked, scrolls it into view. */
  setStep(column, {scroll = false} = {}) {
    for (const node of this.rendered.get(this.current) ?? []) node.classList.remove("cv-current");
    for (const node of this.rendered.get(column) ?? []) node.classList.add("cv-current");
    this.current = column;
    if (scroll) this.scrollToColumn(column);
  }

  /** Brings column `column` into view (see `placeColumn`), unless it is already fully visible. */
  scrollToColumn(column) {
    if (!this.columnWidth) return;
    const {scrollLeft, clientWidth} = this.scroller;
    const start = column * this.pitch;
    if (start < scrollLeft || start + this.columnWidth > scrollLeft + clientWidth) this.placeColumn(column);
    this.renderVisibleColumns();
  }

  /** Scrolls so that column `column` is about in the middle, with a whole column at the left edge. */
  placeColumn(column) {
    const shown = this.fullColumns();
    const lastFirst = Math.max(0, this.columns.length - shown);
    const first = Math.min(lastFirst, Math.max(0, column - Math.floor((shown - 1) / 2)));
    this.scroller.scrollLeft = first * this.pitch;
    this.syncSteps();
  }

  /** Moves the step row with the cells. */
  syncSteps() {
    this.stepsView.scrollLeft = this.scroller.scrollLeft;
  }

  onScroll() {
    this.syncSteps();
    this.scheduleRender();
  }

  scheduleRender() {
    if (this.frameRequest) return;
    this.frameRequest = requestAnimationFrame(() => {
      this.frameRequest = null;
      if (!this.element.isConnected) {
        this.resizeObserver.disconnect();
        return;
      }
      if (this.cellWidth && !this.labelWidth) this.setCellWidth(this.cellWidth);
      else if (this.columnWidth) this.sizeTrack();
      this.syncSteps();
      this.renderVisibleColumns();
    });
  }

  /** Adds the columns now near the visible part and removes the ones far from it. */
  renderVisibleColumns() {
    if (!this.columnWidth) return;
    const pitch = this.pitch;
    const {scrollLeft, clientWidth} = this.scroller;
    const first = Math.max(0, Math.floor(scrollLeft / pitch) - SPARE_COLUMNS);
    const last = Math.min(this.columns.length - 1, Math.ceil((scrollLeft + clientWidth) / pitch) + SPARE_COLUMNS);
    for (const [column, nodes] of this.rendered) {
      if (column >= first && column <= last) continue;
      for (const node of nodes) {
        const slot = node.querySelector(".cv-thumb");
        if (slot) this.lazy.forget(slot);
        node.remove();
      }
      this.rendered.delete(column);
    }
    const [heads, cells] = [document.createDocumentFragment(), document.createDocumentFragment()];
    for (let column = first; column <= last; column++) {
      if (this.rendered.has(column)) continue;
      const [header, ...nodes] = this.buildColumn(column);
      heads.append(header);
      cells.append(...nodes);
    }
    this.steps.append(heads);
    this.track.append(cells);
  }

  /** The header and the cells of column `column` (the header first). */
  buildColumn(column) {
    const step = this.columns[column];
    // The number sticks to the visible part of a column that is partly scrolled out.
    const header = el(
      "button",
      {className: "cv-step-head", attrs: {type: "button", title: `Show step ${step}`, "data-column": column, "data-step": step}},
      [el("span", {className: "cv-step-label", text: step})],
    );
    const nodes = [header];
    this.runs.forEach((run, row) => {
      const panel = this.panelOf(run, step);
      const cell = this.logged[row].has(step)
        ? el("div", {className: "cv-cell"}, [
            thumb(this.lazy, {run, tag: this.tag, step, label: `${run}, ${this.describe(step)}`, panel}),
            panel ? panelCaption(panel) : null,
          ])
        : el("div", {className: "cv-cell cv-missing", text: "–", attrs: {title: `${run} logged no image at step ${step}`}});
      cell.style.setProperty("--cv-row", String(row));
      cell.dataset.column = String(column);
      nodes.push(cell);
    });
    for (const node of nodes) {
      node.style.setProperty("--cv-column", String(column));
      if (column === this.current) node.classList.add("cv-current");
    }
    this.rendered.set(column, nodes);
    return nodes;
  }
}

/** Every logged step of one run for one tag, wrapped over as many lines as needed. */
export class Filmstrip {
  /**
   * @param {{tag: string, run: string, steps: number[], lazy: LazyImages,
   *          describe: function(number): string, onOpen: function(string, number)}} options
   */
  constructor({tag, run, steps, lazy, describe, onOpen, panelOf = () => null}) {
    this.frames = new Map();
    this.current = null;
    this.element = el(
      "ol",
      {className: "cv-film", attrs: {"aria-label": `Filmstrip of ${run}`}},
      steps.map((step) => {
        const panel = panelOf(run, step);
        const frame = el("li", {className: "cv-frame"}, [
          thumb(lazy, {run, tag, step, label: `${run}, ${describe(step)}`, panel}),
          panel ? panelCaption(panel) : null,
          el("span", {className: "cv-frame-step", text: step}),
        ]);
        this.frames.set(step, frame);
        return frame;
      }),
    );
    onThumbClick(this.element, onOpen);
  }

  setStep(step) {
    this.frames.get(this.current)?.classList.remove("cv-current");
    this.frames.get(step)?.classList.add("cv-current");
    this.current = step;
  }
}

const ENTITIES = {nbsp: "\u00a0", amp: "&", lt: "<", gt: ">", quot: '"', apos: "'"};
const ENTITY = /^&(#x[0-9a-f]{1,6}|#[0-9]{1,7}|[a-z]+);/i;
/** Characters a backslash makes literal (CommonMark: ASCII punctuation). */
const ESCAPABLE = /[!-/:-@[-`{-~]/;

/** The character an HTML entity at the start of `text` stands for, and its length; null when none. */
function entityAt(text) {
  const match = ENTITY.exec(text);
  if (!match) return null;
  const name = match[1];
  const code = /^#x/i.test(name) ? parseInt(name.slice(2), 16) : name.startsWith("#") ? Number(name.slice(1)) : NaN;
  const value = Number.isNaN(code) ? ENTITIES[name.toLowerCase()] : code > 0 && code <= 0x10ffff ? String.fromCodePoint(code) : undefined;
  return value === undefined ? null : {value, length: match[0].length};
}

/**
 * The cells of a table line (`| a | b \| c |`): split at the bars not escaped by a backslash; the
 * outer bars are optional but the line must start with one. Null for any other line.
 */
function tableCells(line) {
  const text = line.trim();
  if (!text.startsWith("|")) return null;
  const cells = [];
  let cell = "";
  for (let i = 1; i < text.length; i++) {
    if (text[i] === "\\" && i + 1 < text.length) {
      cell += text[i] + text[++i]; // kept escaped: the inline pass reads it
    } else if (text[i] === "|") {
      cells.push(cell.trim());
      cell = "";
    } else {
      cell += text[i];
    }
  }
  if (cell.trim() || !text.endsWith("|") || text.length === 1) cells.push(cell.trim());
  return cells;
}

/** "left", "right", "center" or "" for a delimiter cell (`---`, `---:`, `:---:`); null for any other. */
function alignment(cell) {
  const match = /^(:?)-+(:?)$/.exec(cell.replace(/\s+/g, ""));
  if (!match) return null;
  return match[1] && match[2] ? "center" : match[2] ? "right" : match[1] ? "left" : "";
}

/**
 * A cell's Markdown as DOM nodes: `**bold**` becomes <strong>, backslash escapes (`\|`, `\*`) and
 * HTML entities (`&nbsp;`) become the characters they stand for, everything else stays text.
 * No HTML is ever parsed: `<b>` shows as the three characters it is.
 */
function inlineNodes(source) {
  // Pass 1: literal characters, and the `**` markers that could open or close bold text.
  const tokens = [];
  let text = "";
  const flush = () => {
    if (text) tokens.push({text});
    text = "";
  };
  for (let i = 0; i < source.length; i++) {
    const char = source[i];
    if (char === "\\" && ESCAPABLE.test(source[i + 1] ?? "")) {
      text += source[++i];
    } else if (char === "*" && source[i + 1] === "*") {
      flush();
      tokens.push({marker: "**"});
      i++;
    } else if (char === "&" && entityAt(source.slice(i))) {
      const entity = entityAt(source.slice(i));
      text += entity.value;
      i += entity.length - 1;
    } else {
      text += char;
    }
  }
  flush();
  // Pass 2: markers pair up in order around some text; an unpaired one is literal.
  const nodes = [];
  for (let i = 0; i < tokens.length; i++) {
    const token = tokens[i];
    if (!token.marker) {
      nodes.push(document.createTextNode(token.text));
      continue;
    }
    const close = tokens.findIndex((t, j) => j > i && t.marker);
    const inner = tokens.slice(i + 1, close).map((t) => t.text).join("");
    if (close > i && inner.trim()) {
      nodes.push(el("strong", {text: inner}));
      i = close;
    } else {
      nodes.push(document.createTextNode("**"));
    }
  }
  return nodes;
}

/** A Markdown pipe table (header line, delimiter line, rows) as a <table>. */
function markdownTable(header, aligns, rows) {
  const row = (cells, tag) =>
    el(
      "tr",
      {},
      aligns.map((align, i) => el(tag, {className: align ? `cv-align-${align}` : ""}, inlineNodes(cells[i] ?? ""))),
    );
  return el("table", {className: "cv-text-table"}, [
    el("thead", {}, [row(header, "th")]),
    el("tbody", {}, rows.map((cells) => row(cells, "td"))),
  ]);
}

/**
 * A text summary (Markdown, as add_text writes it) as DOM: every pipe table (a header line, a
 * delimiter line of as many `---` cells, then the rows starting with `|`) becomes a <table>; the
 * other lines stay preformatted text, as written. Everything is inserted as text nodes; no HTML
 * from the log is ever interpreted.
 */
export function textSummary(text) {
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  const blocks = [];
  let plain = [];
  const flushPlain = () => {
    while (plain.length && !plain[plain.length - 1].trim()) plain.pop();
    while (plain.length && !plain[0].trim()) plain.shift();
    if (plain.length) blocks.push(el("pre", {className: "cv-text-plain", text: plain.join("\n")}));
    plain = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const header = tableCells(lines[i]);
    const delimiter = header && i + 1 < lines.length ? tableCells(lines[i + 1]) : null;
    const aligns = delimiter?.map(alignment);
    if (!header || !aligns || aligns.length !== header.length || aligns.includes(null)) {
      plain.push(lines[i]);
      continue;
    }
    const rows = [];
    let next = i + 2;
    for (let cells; next < lines.length && (cells = tableCells(lines[next])); next++) rows.push(cells);
    flushPlain();
    blocks.push(markdownTable(header, aligns, rows));
    i = next - 1;
  }
  flushPlain();
  return el("div", {className: "cv-text"}, blocks);
}
