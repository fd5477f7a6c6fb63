// The conversation list: open, rename (inline), delete (with an inline
// confirmation rather than a browser dialog), and a mark on conversations
// whose reply is still being written.
import { confirmRow, el, iconButton, request } from "./util.js";

export function conversationTitle(c) {
  return c.title || interpolate(gettext("Conversation %(id)s"), { id: c.id }, true);
}

export class ConversationList {
  constructor({ url, pageUrl, root, onOpen, onDeleted }) {
    this.url = url;
    this.pageUrl = pageUrl;
    this.root = root;
    this.list = root.querySelector("[data-conversations]");
    this.onOpen = onOpen;
    this.onDeleted = onDeleted;
    this.items = [];
    this.active = null;
  }

  href(id) { return `${this.pageUrl}c/${id}/`; }

  async refresh() {
    try {
      this.items = (await request(this.url)).conversations;
    } catch {
      return; // the list keeps what it showed; the next refresh may succeed
    }
    this.render();
  }

  setActive(id) {
    this.active = id;
    for (const link of this.list.querySelectorAll("a.conv-link")) {
      if (Number(link.dataset.id) === id) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
  }

  titleOf(id) {
    const found = this.items.find((c) => c.id === id);
    return found ? conversationTitle(found) : null;
  }

  render() {
    if (this.list.querySelector(".conv.editing, .conv.confirming")) return; // never wipe an open edit
    // Keep focus on the same control across a re-render, or a refresh that
    // lands while the user tabs through the list would throw them out of it.
    const focused = this.list.contains(document.activeElement)
      ? [document.activeElement.closest("li")?.dataset.id, document.activeElement.dataset.role] : null;
    this.list.replaceChildren(...this.items.map((c) => this.item(c)));
    if (!this.items.length) this.list.append(el("li", "muted conv-empty", gettext("No conversations yet.")));
    if (focused) this.focus(focused[0], focused[1]);
  }

  focus(id, role) {
    this.list.querySelector(`li[data-id="${CSS.escape(String(id))}"] [data-role="${role}"]`)?.focus();
  }

  item(c) {
    const li = el("li", "conv");
    li.dataset.id = c.id;
    const title = conversationTitle(c);
    const link = el("a", "conv-link");
    link.href = this.href(c.id);
    link.dataset.id = c.id;
    link.dataset.role = "open";
    link.append(el("span", "conv-title", title));
    if (c.busy) {
      const busy = el("span", "conv-busy");
      busy.append(el("span", "visually-hidden", gettext("(replying)")));
      link.append(busy);
    }
    if (c.id === this.active) link.setAttribute("aria-current", "page");
    link.addEventListener("click", (event) => {
      if (event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return; // new tab etc.
      event.preventDefault();
      this.onOpen(c.id, { push: true });
    });
    const actions = el("div", "conv-actions");
    actions.append(
      iconButton("rename", interpolate(gettext("Rename “%(title)s”"), { title }, true), () => this.rename(li, c),
        "conv-rename"),
      iconButton("delete", interpolate(gettext("Delete “%(title)s”"), { title }, true), () => this.confirm(li, c),
        "conv-delete"),
    );
    li.append(link, actions);
    return li;
  }

  rename(li, c) {
    li.classList.add("editing");
    const input = el("input", "conv-input");
    input.type = "text";
    input.value = c.title || "";
    input.maxLength = 200;
    input.setAttribute("aria-label", gettext("New title"));
    let settled = false;
    const finish = async (save) => {
      if (settled) return;
      settled = true;
      const title = input.value.trim();
      if (save && title && title !== c.title) {
        try {
          await request(`${this.url}${c.id}/`, { method: "PATCH", body: { title } });
          c.title = title;
        } catch { /* keep the old title; the refresh below shows what is stored */ }
      }
      li.classList.remove("editing");
      this.render();
      this.focus(c.id, "rename");
      this.onRenamed?.(c.id);
      this.refresh();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.isComposing) { event.preventDefault(); finish(true); }
      if (event.key === "Escape") { event.preventDefault(); event.stopPropagation(); finish(false); }
    });
    input.addEventListener("blur", () => finish(true));
    li.replaceChildren(input);
    input.focus();
    input.select();
  }

  confirm(li, c) {
    const close = () => {
      li.classList.remove("confirming");
      this.render();
      this.focus(c.id, "delete");
    };
    const remove = async () => {
      try {
        await request(`${this.url}${c.id}/`, { method: "DELETE" });
      } catch { close(); return; }
      li.classList.remove("confirming");
      this.items = this.items.filter((x) => x.id !== c.id);
      this.render();
      this.onDeleted(c.id);
      this.root.querySelector("[data-role='new']")?.focus();
    };
    confirmRow(li, {
      prefix: "conv", id: c.id, message: gettext("Delete this conversation?"), onYes: remove, onNo: close,
    });
  }
}
