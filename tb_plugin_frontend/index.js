// "CNN Vis" tab of TensorBoard: the cnnvis images of every run (rows) at every logged step
// (columns), for one kind / layer / view, plus a filmstrip of one run and the model's layer table.
//
// TensorBoard loads this module in an iframe whose <base href> is /data/plugin/cnnvis/ and calls
// render(). Only plain DOM: no framework, no inline script, no eval (TensorBoard's CSP forbids them).
// This module only sets the frame up; the tab itself is the App of app.js.

import {App} from "./static/app.js";
import {el} from "./static/dom.js";

/** Entry point called by TensorBoard. */
export async function render() {
  await addStylesheet("./static/style.css");
  followTensorBoardTheme();
  await new App(document.body).start();
}

/** Resolves once the stylesheet has loaded (or failed), so the first view is drawn styled. */
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
