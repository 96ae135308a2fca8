// DOM helpers shared by the node widget and the sidebar.

const STYLESHEET_ID = "finetune-dashboard-css";

// A small element factory: el("div", {class: "x", onclick: fn}, child, "text", ...).
export function el(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value == null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") element.addEventListener(key.slice(2), value);
    else if (key === "class") element.className = value;
    else if (key === "dataset") Object.assign(element.dataset, value);
    else element.setAttribute(key, value === true ? "" : String(value));
  }
  element.append(...present(children));
  return element;
}

// Replace an element's children; like el(), it leaves out null, undefined and false (`cond && child`).
export function setChildren(element, ...children) {
  element.replaceChildren(...present(children));
}

const present = (children) => children.flat().filter((child) => child != null && child !== false && child !== "");

// A button with an icon; `data-action` names what it does. handler(button) runs on click.
export function actionButton(action, label, icon, handler) {
  return el("button", { class: "finetune-button", type: "button", dataset: { action }, onclick: (event) => handler(event.currentTarget) },
    el("i", { class: icon }), label);
}

// The dashboard's stylesheet, added to the page once.
export function ensureStyles() {
  if (document.getElementById(STYLESHEET_ID)) return;
  const link = el("link", { id: STYLESHEET_ID, rel: "stylesheet", href: new URL("./dashboard.css", import.meta.url).href });
  document.head.append(link);
}
