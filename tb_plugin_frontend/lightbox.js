// Enlarged view of one image, over the page. Escape or a click on the backdrop closes it; the
// arrow keys walk through the steps of the same run.

import {el} from "./dom.js";
import {PIXELATED_MAX} from "./views.js";

export class Lightbox {
  constructor() {
    this.items = [];
    this.index = 0;
    this.returnFocus = null;
    this.image = el("img", {className: "cv-lightbox-image", props: {alt: ""}});
    this.image.addEventListener("load", () => {
      const small = this.image.naturalWidth <= PIXELATED_MAX && this.image.naturalHeight <= PIXELATED_MAX;
      this.image.classList.toggle("cv-pixelated", small);
    });
    this.swatch = el("span", {className: "cv-swatch"});
    this.runName = el("span", {className: "cv-lightbox-run"});
    this.details = el("span", {className: "cv-lightbox-details"});
    this.prevButton = el("button", {
      className: "cv-icon-button",
      text: "‹",
      attrs: {type: "button", "aria-label": "Previous step", title: "Previous step (←)"},
      on: {click: () => this.show(this.index - 1)},
    });
    this.nextButton = el("button", {
      className: "cv-icon-button",
      text: "›",
      attrs: {type: "button", "aria-label": "Next step", title: "Next step (→)"},
      on: {click: () => this.show(this.index + 1)},
    });
    this.closeButton = el("button", {
      className: "cv-icon-button",
      text: "×",
      attrs: {type: "button", "aria-label": "Close", title: "Close (Esc)"},
      on: {click: () => this.close()},
    });
    this.panel = el("figure", {className: "cv-lightbox-panel"}, [
      this.image,
      el("figcaption", {className: "cv-lightbox-caption"}, [
        this.prevButton,
        el("span", {className: "cv-lightbox-title"}, [this.swatch, this.runName, this.details]),
        this.nextButton,
        this.closeButton,
      ]),
    ]);
    this.overlay = el(
      "div",
      {
        className: "cv-lightbox",
        attrs: {role: "dialog", "aria-modal": "true", "aria-label": "Enlarged image"},
        props: {hidden: true},
        on: {click: (event) => event.target === this.overlay && this.close()},
      },
      [this.panel],
    );
    this.onKey = (event) => this.handleKey(event);
    document.body.append(this.overlay);
  }

  /**
   * Opens on `items[index]`.
   * @param {Array<{src: string, run: string, color: string, details: string}>} items
   * @param {number} index
   */
  open(items, index) {
    this.items = items;
    this.returnFocus = document.activeElement;
    this.overlay.hidden = false;
    document.addEventListener("keydown", this.onKey);
    this.show(index);
    this.closeButton.focus();
  }

  close() {
    if (this.overlay.hidden) return;
    this.overlay.hidden = true;
    document.removeEventListener("keydown", this.onKey);
    this.image.removeAttribute("src");
    if (this.returnFocus instanceof HTMLElement) this.returnFocus.focus();
  }

  get isOpen() {
    return !this.overlay.hidden;
  }

  show(index) {
    if (index < 0 || index >= this.items.length) return;
    this.index = index;
    const item = this.items[index];
    this.image.src = item.src;
    this.image.alt = `${item.run}, ${item.details}`;
    this.swatch.style.setProperty("--run-color", item.color);
    this.runName.textContent = item.run;
    this.details.textContent = item.details;
    this.prevButton.disabled = index === 0;
    this.nextButton.disabled = index === this.items.length - 1;
  }

  handleKey(event) {
    switch (event.key) {
      case "Escape":
        this.close();
        break;
      case "ArrowLeft":
        this.show(this.index - 1);
        break;
      case "ArrowRight":
        this.show(this.index + 1);
        break;
      default:
        return;
    }
    event.preventDefault();
  }
}
