// Translation of a finished message (CONTRACT §9): each message's
// "Translate" group with the two targets, and each translation under the
// original, labelled with its target and engine (with the server's note when
// it sends one, e.g. that it ran on the CPU because Ollama holds the GPU).
// A target shown, or asked for and not yet answered, is never asked for
// again; one that failed may be asked for again.
import { el } from "./util.js";
import { renderMarkdown } from "./markdown.js";

// The targets, named in the page's language (the language switch in
// base.html names each language in itself, and its buttons' names must stay
// its own).
const TARGETS = { en: () => gettext("English"), "zh-hans": () => gettext("Chinese") };

function targetName(target) { return TARGETS[target] ? TARGETS[target]() : target; }

// One message's translations.
export class Translations {
  constructor({ markdown, onRequest }) {
    this.id = null;
    this.markdown = markdown; // a reply is Markdown, a question plain text
    this.onRequest = onRequest; // (translations, target) -> whether it was sent
    this.state = new Map(); // target -> "pending" | "shown"
    this.items = new Map(); // target -> its element under the message
    this.buttons = new Map();
    this.group = el("div", "msg-translate");
    this.group.setAttribute("role", "group");
    const label = el("span", "msg-translate-label", gettext("Translate:"));
    this.group.append(label);
    for (const target of Object.keys(TARGETS)) {
      const button = el("button", "msg-action", targetName(target));
      button.type = "button";
      button.dataset.target = target;
      button.setAttribute("aria-label",
        interpolate(gettext("Translate into %(language)s"), { language: targetName(target) }, true));
      button.addEventListener("click", () => this.request(target));
      this.buttons.set(target, button);
      this.group.append(button);
    }
    this.list = el("div", "msg-translations");
    // A translation comes seconds after the click: announce it when it does.
    this.list.setAttribute("aria-live", "polite");
  }

  get waiting() { return [...this.state.values()].includes("pending"); }

  request(target) {
    if (this.id === null || this.state.has(target)) return;
    if (!this.onRequest(this, target)) return;
    this.state.set(target, "pending");
    const item = this.item(target);
    item.append(el("p", "msg-wait", interpolate(gettext("Translating into %(language)s…"),
      { language: targetName(target) }, true)));
    this.update();
  }

  // `translations` of a message read back from the server: {target: {text, engine}}.
  restore(translations) {
    for (const [target, t] of Object.entries(translations || {})) this.show({ target, ...t });
  }

  // `message.translation`.
  show(frame) {
    const { target } = frame;
    this.state.set(target, "shown");
    const item = this.item(target);
    const head = this.head(target);
    const engine = frame.device
      ? interpolate(gettext("%(engine)s on %(device)s"), { engine: frame.engine, device: frame.device }, true)
      : frame.engine;
    if (engine) head.append(" · ", el("span", "msg-translation-engine", engine));
    const body = el("div", `msg-body ${this.markdown ? "md" : "plain"}`);
    body.lang = target;
    if (this.markdown) body.append(renderMarkdown(frame.text ?? ""));
    else body.textContent = frame.text ?? "";
    item.append(head);
    if (frame.note) item.append(el("p", "msg-translation-note", frame.note));
    item.append(body);
    this.update();
  }

  head(target) {
    const head = el("p", "msg-translation-head");
    head.append(el("span", "msg-translation-lang",
      interpolate(gettext("%(language)s translation"), { language: targetName(target) }, true)));
    return head;
  }

  // A `chat.error` for this message while a translation was asked for. The
  // frame names no target unless the server adds one: then every target
  // still waiting failed.
  failed(frame) {
    const targets = frame.target ? [frame.target]
      : [...this.state].filter(([, s]) => s === "pending").map(([t]) => t);
    for (const target of targets.length ? targets : ["error"]) {
      this.state.delete(target);
      const item = this.item(target);
      item.classList.add("failed");
      if (TARGETS[target]) item.append(this.head(target));
      item.append(el("p", "msg-error", `${frame.code}: ${frame.detail}`));
    }
    this.update();
  }

  // The element for a target, emptied; in the order of TARGETS.
  item(target) {
    let item = this.items.get(target);
    if (!item) {
      item = el("section", "msg-translation");
      item.dataset.target = target;
      this.items.set(target, item);
      const order = Object.keys(TARGETS);
      const next = [...this.items.values()].find((other) => order.indexOf(other.dataset.target) > order.indexOf(target));
      this.list.insertBefore(item, next && next !== item ? next : null);
    }
    item.classList.remove("failed");
    item.replaceChildren();
    if (TARGETS[target]) {
      item.setAttribute("aria-label", interpolate(gettext("%(language)s translation"),
        { language: targetName(target) }, true));
    }
    return item;
  }

  update() {
    for (const [target, button] of this.buttons) {
      const state = this.state.get(target);
      button.disabled = Boolean(state);
      button.setAttribute("aria-busy", String(state === "pending"));
      button.title = state === "shown" ? gettext("The translation is shown below") : "";
    }
  }
}

// The page's translations by message id, and the frames for them: a
// `message.translation`, and a `chat.error` for a message whose translation
// was asked for (or whose code says it is a translation's).
export class Translator {
  constructor({ send }) {
    this.send = send; // (frame) -> whether it went out
    this.byId = new Map();
  }

  create({ markdown }) {
    return new Translations({
      markdown,
      onRequest: (t, target) => this.send({ type: "message.translate", message: t.id, target }),
    });
  }

  attach(id, translations) {
    translations.id = id;
    this.byId.set(id, translations);
  }

  forget(id) { this.byId.delete(id); }

  clear() { this.byId.clear(); }

  // Whether the frame was a translation's (and so handled here).
  handle(frame) {
    if (frame.type === "message.translation") {
      this.byId.get(frame.message)?.show(frame);
      return true;
    }
    if (frame.type !== "chat.error" || frame.message == null) return false;
    const translations = this.byId.get(frame.message);
    if (!String(frame.code).startsWith("translation_") && !translations?.waiting) return false;
    translations?.failed(frame);
    return true;
  }
}
