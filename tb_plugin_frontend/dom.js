// Tiny DOM helpers. Every piece of text goes through textContent or an attribute value: run
// names, tags and error messages are user data and must never be parsed as HTML.

/**
 * Creates an element.
 * @param {string} tag element name
 * @param {{className?: string, text?: *, attrs?: Object<string, *>, props?: Object<string, *>,
 *          on?: Object<string, Function>}} [options]
 * @param {Array<Node|string|null|undefined|false>} [children] appended in order; falsy ones skipped
 * @returns {HTMLElement}
 */
export function el(tag, options = {}, children = []) {
  const node = document.createElement(tag);
  const {className, text, attrs = {}, props = {}, on = {}} = options;
  if (className) node.className = className;
  if (text !== undefined) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  Object.assign(node, props);
  for (const [type, listener] of Object.entries(on)) node.addEventListener(type, listener);
  for (const child of children) {
    if (child) node.append(child);
  }
  return node;
}

/**
 * A labelled <select>; options are [value, label] pairs.
 * @returns {HTMLSelectElement}
 */
export function select(options, value, onChange, ariaLabel) {
  const node = el("select", {attrs: {"aria-label": ariaLabel}, on: {change: () => onChange(node.value)}});
  for (const [optionValue, label] of options) {
    node.append(el("option", {text: label, props: {value: optionValue}}));
  }
  node.value = value;
  return node;
}

/** A caption + control pair for the controls bar. */
export function field(label, control, className = "") {
  return el("label", {className: `cv-field ${className}`.trim()}, [
    el("span", {className: "cv-label", text: label}),
    control,
  ]);
}
