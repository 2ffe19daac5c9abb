// The tab's selection, kept in the URL of the TensorBoard page so that a view can be shared and
// survives a reload. Keys follow TensorBoard's convention for plugin data in the URL
// (`p.<plugin>.<key>` query arguments), which TensorBoard keeps while it switches tabs:
//   ?p.cnnvis.kind=gradcam&p.cnnvis.layer=layer4&p.cnnvis.view=probe_002&p.cnnvis.step=120
//    &p.cnnvis.size=128&p.cnnvis.film=runA&p.cnnvis.metrics=health/probe&p.cnnvis.hide=runB#cnnvis

const PREFIX = "p.cnnvis.";
const SINGLE_KEYS = ["kind", "layer", "view", "step", "size", "film", "metrics", "panel", "compare"];

export const SIZE = {min: 48, max: 480, step: 8, initial: 160};
/** Sliders fire many events and browsers throttle history updates: write once they pause. */
const SAVE_DELAY_MS = 150;
let saveTimer = null;

/**
 * The window whose URL holds the state: TensorBoard's page around the iframe (same origin), or
 * this frame itself when it is opened on its own.
 */
function hostWindow() {
  if (window.parent === window) return window;
  try {
    void window.parent.location.href; // throws when the parent is not same-origin
    return window.parent;
  } catch {
    return window;
  }
}

/** Digits only, as a number; null otherwise. */
function parseStep(text) {
  return text !== null && /^[0-9]{1,15}$/.test(text) ? Number(text) : null;
}

function parseSize(text) {
  const size = Number.parseInt(text ?? "", 10);
  if (!Number.isFinite(size)) return SIZE.initial;
  return Math.min(SIZE.max, Math.max(SIZE.min, size));
}

/**
 * Reads the selection from the URL. Values are only hints: the app checks them against the data.
 * @returns {{kind: ?string, layer: ?string, view: ?string, step: ?number, size: number,
 *            film: ?string, metrics: ?string, panel: ?string, compare: ?string, hidden: Set<string>}}
 */
export function readState() {
  const params = new URL(hostWindow().location.href).searchParams;
  const get = (key) => params.get(PREFIX + key);
  return {
    kind: get("kind"),
    layer: get("layer"),
    view: get("view"),
    step: parseStep(get("step")),
    size: parseSize(get("size")),
    film: get("film"),
    metrics: get("metrics"),
    panel: get("panel"),
    compare: get("compare"),
    hidden: new Set(params.getAll(PREFIX + "hide")),
  };
}

/** Writes the selection into the URL (without adding a history entry) once changes pause. */
export function saveState(state) {
  clearTimeout(saveTimer);
  saveTimer = setTimeout(() => writeState(state), SAVE_DELAY_MS);
}

function writeState(state) {
  const host = hostWindow();
  const url = new URL(host.location.href);
  for (const key of [...url.searchParams.keys()]) {
    if (key.startsWith(PREFIX)) url.searchParams.delete(key);
  }
  for (const key of SINGLE_KEYS) {
    if (state[key] !== null && state[key] !== undefined) url.searchParams.set(PREFIX + key, String(state[key]));
  }
  for (const run of [...state.hidden].sort()) url.searchParams.append(PREFIX + "hide", run);
  if (url.href !== host.location.href) host.history.replaceState(host.history.state, "", url.href);
}
