// The controls bar above the views: kind, layer, image and size; the step slider, the exact-step box
// and their arrows; the run chips. It holds no state of its own: it reports what the user does to the
// app (`on` callbacks) and shows what the app tells it.

import {el, field, select} from "./dom.js";
import {runLabel} from "./views.js";
import {SIZE} from "./state.js";

/** How a view is named in the lists and titles: "probe image 3", or the view's own name ("grid"). */
export function viewLabel(view) {
  return view.probe === null ? view.view : `probe image ${view.probe}`;
}

function iconButton(text, label, onClick) {
  return el("button", {className: "cv-icon-button", text, attrs: {type: "button", "aria-label": label, title: label}, on: {click: onClick}});
}

function replaceOptions(node, options, value) {
  node.replaceChildren(...options.map(([optionValue, label]) => el("option", {text: label, props: {value: optionValue}})));
  node.value = value;
}

export class Controls {
  /**
   * @param {{kinds: Array<{kind: string, label: string}>, runs: string[], state: Object,
   *          colorOf: function(string): string,
   *          on: {select: function(Object), size: function(number), step: function(number),
   *               stepBy: function(number), pickStep: function(string), toggleRun: function(string, boolean),
   *               showRuns: function(boolean), reload: function(), panel: function(?string)}}} options
   *   `kinds` as /index lists them (their labels come from the data), `state` the app's selection.
   */
  constructor({kinds, runs, state, colorOf, on}) {
    this.kindButtons = new Map(
      kinds.map(({kind, label}) => [
        kind,
        el("button", {
          text: label,
          attrs: {type: "button", "data-kind": kind, title: label},
          on: {click: () => on.select({kind})},
        }),
      ]),
    );
    this.layerSelect = select([], "", (layer) => on.select({layer}), "Layer");
    this.viewSelect = select([], "", (view) => on.select({view}), "Image");
    this.panelSelect = select([], "", (panel) => on.panel(panel || null), "Panel");
    this.panelField = field("Panel", this.panelSelect);
    this.panelField.hidden = true;
    this.sizeInput = el("input", {
      props: {type: "range", min: SIZE.min, max: SIZE.max, step: SIZE.step, value: state.size},
      attrs: {"aria-label": "Image size"},
      on: {input: () => on.size(Number(this.sizeInput.value))},
    });
    this.stepSlider = el("input", {
      className: "cv-step-slider",
      props: {type: "range", min: 0, step: 1},
      attrs: {"aria-label": "Step"},
      on: {input: () => on.step(Number(this.stepSlider.value))},
    });
    // A step being typed is not overwritten by a redraw (new data arriving) before it is committed.
    this.typingStep = false;
    this.shownStep = "";
    this.stepInput = el("input", {
      className: "cv-step-input",
      props: {type: "number", min: 0, step: 1},
      attrs: {"aria-label": "Exact step"},
      on: {
        input: () => {
          this.typingStep = true;
        },
        change: () => {
          this.typingStep = false;
          on.pickStep(this.stepInput.value);
        },
        blur: () => {
          if (!this.typingStep) return;
          this.typingStep = false; // left without a change (the value typed was the one shown)
          this.stepInput.value = this.shownStep;
        },
      },
    });
    this.prevButton = iconButton("‹", "Previous logged step", () => on.stepBy(-1));
    this.nextButton = iconButton("›", "Next logged step", () => on.stepBy(1));
    this.stepInfo = el("span", {className: "cv-step-info"});
    this.status = el("span", {className: "cv-status", attrs: {role: "status", "aria-live": "polite"}});
    this.runChips = new Map(
      runs.map((run) => {
        const box = el("input", {
          props: {type: "checkbox", checked: !state.hidden.has(run)},
          on: {change: () => on.toggleRun(run, box.checked)},
        });
        return [run, {box, chip: el("label", {className: "cv-chip"}, [box, runLabel(run, colorOf(run))])}];
      }),
    );
    this.element = el("header", {className: "cv-bar"}, [
      el("div", {className: "cv-bar-row"}, [
        el("div", {className: "cv-field"}, [
          el("span", {className: "cv-label", text: "Kind"}),
          el("div", {className: "cv-segmented", attrs: {role: "group", "aria-label": "Kind"}}, [...this.kindButtons.values()]),
        ]),
        field("Layer", this.layerSelect),
        field("Image", this.viewSelect),
        this.panelField,
        field("Size", this.sizeInput, "cv-size"),
        el("span", {className: "cv-spacer"}),
        this.status,
        iconButton("↻", "Reload data", () => on.reload()),
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
        el("button", {className: "cv-link", text: "all", attrs: {type: "button"}, on: {click: () => on.showRuns(true)}}),
        el("button", {className: "cv-link", text: "none", attrs: {type: "button"}, on: {click: () => on.showRuns(false)}}),
      ]),
    ]);
  }

  /** Brings the kind buttons, the layer / view lists and the run chips in line with the selection. */
  sync({kind, layer, view}, hidden) {
    for (const [name, button] of this.kindButtons) button.setAttribute("aria-pressed", String(name === kind.kind));
    replaceOptions(this.layerSelect, kind.layers.map((l) => [l.layer, l.layer]), layer.layer);
    replaceOptions(this.viewSelect, layer.views.map((v) => [v.view, viewLabel(v)]), view.view);
    const withData = new Set(view.runs);
    for (const [run, {box, chip}] of this.runChips) {
      box.checked = !hidden.has(run);
      chip.classList.toggle("cv-no-data", !withData.has(run));
      chip.title = withData.has(run) ? run : `${run} logged no image for this selection`;
    }
  }

  /**
   * Lists the panels of the current pictures ([key, label] pairs, "" first for the whole picture) and selects
   * `value`; hidden when the pictures have no panel records.
   */
  setPanels(options, value) {
    this.panelField.hidden = options.length === 0;
    replaceOptions(this.panelSelect, [["", "whole picture"], ...options], value ?? "");
  }

  /** Ticks (or unticks) every run chip. */
  checkRuns(shown) {
    for (const {box} of this.runChips.values()) box.checked = shown;
  }

  /** Sets the step controls' ranges to the logged steps `columns` (ascending). */
  syncSteps(columns) {
    const count = columns.length;
    this.stepSlider.max = String(Math.max(0, count - 1));
    this.stepSlider.disabled = count < 2;
    this.stepInput.disabled = count === 0;
    this.stepInput.min = String(columns[0] ?? 0);
    this.stepInput.max = String(columns[count - 1] ?? 0);
  }

  /** Shows column `index` of `columns` as the current step. */
  showStep(index, columns) {
    const count = columns.length;
    this.stepSlider.value = String(index);
    this.shownStep = String(columns[index]);
    if (!this.typingStep) this.stepInput.value = this.shownStep;
    this.stepInfo.textContent = `${index + 1} of ${count} logged steps`;
    this.prevButton.disabled = index === 0;
    this.nextButton.disabled = index === count - 1;
  }

  /** Puts `step` back in the exact-step box (after a typed value that is no step). */
  resetStepInput(step) {
    this.stepInput.value = String(step ?? "");
  }

  /** A short message beside the reload button ("" clears it). */
  setStatus(text) {
    this.status.textContent = text;
  }
}
