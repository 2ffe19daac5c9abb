export function render() {
  const p = document.createElement("p");
  p.textContent = "hello " + window.parent.location.href;
  document.body.appendChild(p);
}
