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

/** A clickable image slot (see `onThumbClick`); the image itself arrives through `lazy`. */
function thumb(lazy, {run, tag, step, label}) {
  const slot = el("button", {
    className: "cv-thumb",
    attrs: {type: "button", title: `${label} (click to enlarge)`, "data-run": run, "data-step": step},
  });
  lazy.add(slot, imageUrl(run, tag, step), label);
  return slot;
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

/**
 * One row per run, one column per logged step, for one tag. A cell is empty when its run did not
 * log that step; the column of the current step is highlighted.
 *
 * Only the columns near the visible part of the horizontally scrolling area exist in the page
 * (runs x 1000 steps would otherwise be tens of thousands of elements), placed by CSS from their
 * column and row numbers. The run labels sit outside the scrolling part, so no image hides behind
 * them and none is requested for nothing.
 */
export class StepGrid {
  /**
   * @param {{tag: string, runs: string[], columns: number[], stepsByRun: Map<string, number[]>,
   *          colorOf: function(string): string, lazy: LazyImages, describe: function(number): string,
   *          onOpen: function(string, number), onPickStep: function(number)}} options
   */
  constructor({tag, runs, columns, stepsByRun, colorOf, lazy, describe, onOpen, onPickStep}) {
    Object.assign(this, {tag, runs, columns, lazy, describe});
    this.logged = runs.map((run) => new Set(stepsByRun.get(run)));
    this.rendered = new Map(); // column -> its elements
    this.current = -1;
    this.cellWidth = 0;
    this.frameRequest = null;
    this.track = el("div", {className: "cv-grid"});
    this.track.style.setProperty("--cv-columns", String(columns.length));
    this.track.style.setProperty("--cv-rows", String(runs.length));
    onThumbClick(this.track, onOpen);
    this.track.addEventListener("click", (event) => {
      const header = event.target.closest(".cv-step-head");
      if (header) onPickStep(Number(header.dataset.column));
    });
    this.scroller = el("div", {className: "cv-grid-scroll"}, [this.track]);
    this.scroller.addEventListener("scroll", () => this.scheduleRender(), {passive: true});
    new ResizeObserver(() => this.scheduleRender()).observe(this.scroller);
    const labels = runs.map((run) => {
      const label = el("div", {className: "cv-row-head"}, [runLabel(run, colorOf(run))]);
      label.style.setProperty("--run-color", colorOf(run));
      return label;
    });
    this.element = el("div", {className: "cv-grid-wrap"}, [
      el("div", {className: "cv-grid-labels"}, [el("div", {className: "cv-corner", text: "run \\ step"}), ...labels]),
      this.scroller,
    ]);
    this.element.style.setProperty("--cv-gap", `${GAP}px`);
    this.element.style.setProperty("--cv-header", `${HEADER_HEIGHT}px`);
  }

  /** The cell width in pixels changed (the size control): keep the right columns in the page. */
  setCellWidth(width) {
    this.cellWidth = width;
    this.renderVisibleColumns();
  }

  /** Highlights column `column` and, when asked, scrolls it into view. */
  setStep(column, {scroll = false} = {}) {
    for (const node of this.rendered.get(this.current) ?? []) node.classList.remove("cv-current");
    for (const node of this.rendered.get(column) ?? []) node.classList.add("cv-current");
    this.current = column;
    if (scroll) this.scrollToColumn(column);
  }

  /** Centres column `column` in the scrolling part, unless it is already fully visible. */
  scrollToColumn(column) {
    const pitch = this.cellWidth + GAP;
    const {scrollLeft, clientWidth} = this.scroller;
    const [start, end] = [column * pitch, column * pitch + this.cellWidth];
    if (start < scrollLeft || end > scrollLeft + clientWidth) {
      this.scroller.scrollLeft = Math.max(0, start - (clientWidth - this.cellWidth) / 2);
    }
    this.renderVisibleColumns();
  }

  scheduleRender() {
    if (this.frameRequest) return;
    this.frameRequest = requestAnimationFrame(() => {
      this.frameRequest = null;
      this.renderVisibleColumns();
    });
  }

  /** Adds the columns now near the visible part and removes the ones far from it. */
  renderVisibleColumns() {
    if (!this.cellWidth) return;
    const pitch = this.cellWidth + GAP;
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
    const fragment = document.createDocumentFragment();
    for (let column = first; column <= last; column++) {
      if (!this.rendered.has(column)) fragment.append(...this.buildColumn(column));
    }
    this.track.append(fragment);
  }

  buildColumn(column) {
    const step = this.columns[column];
    const header = el("button", {
      className: "cv-step-head",
      text: step,
      attrs: {type: "button", title: `Show step ${step}`, "data-column": column},
    });
    const nodes = [header];
    this.runs.forEach((run, row) => {
      const cell = this.logged[row].has(step)
        ? el("div", {className: "cv-cell"}, [thumb(this.lazy, {run, tag: this.tag, step, label: `${run}, ${this.describe(step)}`})])
        : el("div", {className: "cv-cell cv-missing", text: "–", attrs: {title: `${run} logged no image at step ${step}`}});
      cell.style.setProperty("--cv-row", String(row));
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
  constructor({tag, run, steps, lazy, describe, onOpen}) {
    this.frames = new Map();
    this.current = null;
    this.element = el(
      "ol",
      {className: "cv-film", attrs: {"aria-label": `Filmstrip of ${run}`}},
      steps.map((step) => {
        const frame = el("li", {className: "cv-frame"}, [
          thumb(lazy, {run, tag, step, label: `${run}, ${describe(step)}`}),
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

/** Decodes the few HTML entities Markdown tables use (e.g. &nbsp; for indentation) into plain text. */
function decodeEntities(text) {
  return text.replace(/&(#x[0-9a-f]{1,6}|#[0-9]{1,7}|[a-z]+);/gi, (match, name) => {
    const code = name.startsWith("#x") || name.startsWith("#X") ? parseInt(name.slice(2), 16) : name.startsWith("#") ? Number(name.slice(1)) : NaN;
    if (Number.isInteger(code)) return code > 0 && code <= 0x10ffff ? String.fromCodePoint(code) : match;
    return ENTITIES[name.toLowerCase()] ?? match;
  });
}

function tableCells(line) {
  const trimmed = line.trim();
  if (!trimmed.startsWith("|")) return null;
  return trimmed.replace(/^\||\|$/g, "").split("|").map((cell) => decodeEntities(cell.trim()));
}

function markdownTable(rows) {
  const [header, separator = [], ...rest] = rows;
  const hasSeparator = separator.length > 0 && separator.every((cell) => /^:?-{3,}:?$/.test(cell));
  const body = hasSeparator ? rest : rows.slice(1);
  const numeric = header.map((_, i) => hasSeparator && /-:$/.test(separator[i] ?? ""));
  const row = (cells, tag) =>
    el("tr", {}, cells.map((cell, i) => el(tag, {text: cell, className: numeric[i] ? "cv-num" : ""})));
  return el("table", {className: "cv-text-table"}, [
    el("thead", {}, [row(header, "th")]),
    el("tbody", {}, body.map((cells) => row(cells, "td"))),
  ]);
}

/**
 * A text summary (Markdown, as add_text writes it) as DOM: tables become <table>s, other lines
 * paragraphs. Everything is inserted as text; no HTML from the log is ever interpreted.
 */
export function textSummary(text) {
  const blocks = [];
  let table = null;
  for (const line of text.split("\n")) {
    const cells = tableCells(line);
    if (cells) {
      (table ??= []).push(cells);
      continue;
    }
    if (table) blocks.push(markdownTable(table));
    table = null;
    if (line.trim()) blocks.push(el("p", {text: decodeEntities(line)}));
  }
  if (table) blocks.push(markdownTable(table));
  return el("div", {className: "cv-text"}, blocks);
}
