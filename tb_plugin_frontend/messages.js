// The views shown instead of data: loading, no cnnvis data yet, and an error with a retry button.

import {el} from "./dom.js";

const SNIPPET = 'vis = VisLogger(model, "runs/exp", probe=probe_images)\nvis.step(step)';

/** A spinner and `text`, announced to screen readers. */
export function loadingView(text) {
  return el("div", {className: "cv-loading-view", attrs: {role: "status"}}, [el("span", {className: "cv-spinner"}), el("span", {text})]);
}

/** What to do when no run holds cnnvis images yet. */
export function emptyView() {
  return el("section", {className: "cv-card cv-message"}, [
    el("h2", {text: "No cnnvis data: add VisLogger to your training loop"}),
    el("pre", {className: "cv-code", text: SNIPPET}),
    el("p", {
      text: "Then start TensorBoard on the folder holding the runs (tensorboard --logdir runs). This tab checks for new data every 30 seconds.",
    }),
  ]);
}

/** `title`, the message of `error` (as text: it may quote user data) and a button calling `retry`. */
export function errorView(title, error, retry) {
  return el("section", {className: "cv-card cv-message cv-error", attrs: {role: "alert"}}, [
    el("h2", {text: title}),
    el("p", {className: "cv-error-text", text: error.message}),
    el("button", {className: "cv-button", text: "Retry", attrs: {type: "button"}, on: {click: retry}}),
  ]);
}

/** A short note inside a card that has nothing to show yet. */
export function emptyMessage(text) {
  return el("p", {className: "cv-note cv-empty", text});
}
