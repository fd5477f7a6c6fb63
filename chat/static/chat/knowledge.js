// The knowledge panel (CONTRACT §8): the user's knowledge bases with their
// status and indexing progress, a base made from a name and files, more
// files for a base, a base deleted (after an inline confirmation), and a
// checkbox per base to answer from it. Each file's own error (no text
// layer, encrypted, not a PDF…) is shown by its name.
import { confirmRow, el, iconButton, request } from "./util.js";

// The server indexes in a worker and reports progress on the base; the
// page reads the list again this often while any base is indexing (issue 15).
const POLL_MS = 1000;

function statusText(base, uploading) {
  if (uploading) return gettext("Uploading…");
  if (base.status === "indexing") {
    const percent = `${Math.floor(100 * Math.min(1, Math.max(0, Number(base.progress) || 0)))}%`;
    return interpolate(gettext("Indexing… %(percent)s"), { percent }, true);
  }
  if (base.status === "error") return gettext("Indexing failed");
  return [
    gettext("Ready"),
    interpolate(ngettext("%(n)s document", "%(n)s documents", base.documents), { n: base.documents }, true),
    interpolate(ngettext("%(n)s chunk", "%(n)s chunks", base.chunks), { n: base.chunks }, true),
  ].join(" · ");
}

function fileText(file) {
  if (file.status === "error") return file.error || gettext("could not be read");
  if (file.status === "indexing") return gettext("indexing…");
  return interpolate(ngettext("%(n)s chunk", "%(n)s chunks", file.chunks), { n: file.chunks }, true);
}

export class KnowledgePanel {
  constructor({ url, root, onChange }) {
    this.url = url;
    this.root = root;
    this.list = root.querySelector("[data-knowledge]");
    this.form = root.querySelector("[data-knowledge-create]");
    this.alert = root.querySelector("[data-knowledge-alert]");
    this.onChange = onChange; // the bases picked, or their names, changed
    this.bases = [];
    this.chosen = new Set(); // ids ticked; only those ready are sent
    this.uploading = new Set(); // ids with files on their way
    this.filesOpen = new Map(); // id -> the user's own open/closed choice for its file list
    this.timer = null;
    this.form.addEventListener("submit", (event) => { event.preventDefault(); this.create(); });
  }

  // The ids to send with a message: ticked and ready, as integers.
  picked() { return this.pickedBases().map((b) => b.id); }

  pickedBases() { return this.bases.filter((b) => b.status === "ready" && this.chosen.has(b.id)); }

  setAlert(text) {
    this.alert.textContent = text;
    this.alert.hidden = !text;
  }

  async refresh() {
    clearTimeout(this.timer);
    this.timer = null;
    try {
      this.bases = (await request(this.url)).knowledge;
    } catch {
      this.schedule(); // keep what is shown; try again while something was indexing
      return;
    }
    for (const id of this.chosen) if (!this.bases.some((b) => b.id === id)) this.chosen.delete(id);
    this.render();
    this.schedule();
    this.onChange();
  }

  schedule() {
    if (this.timer === null && this.bases.some((b) => b.status === "indexing")) {
      this.timer = setTimeout(() => this.refresh(), POLL_MS);
    }
  }

  // A base's answer (create, add files): shown at once, and polled.
  updated(base) {
    const at = this.bases.findIndex((b) => b.id === base.id);
    if (at === -1) this.bases.push(base); else this.bases[at] = base;
    this.render();
    this.onChange();
    if (base.status === "indexing") this.refresh();
  }

  async create() {
    const name = this.form.elements.name.value.trim();
    const files = this.form.elements.files.files;
    if (!name || !files.length) return;
    const button = this.form.querySelector("button[type='submit']");
    const body = new FormData();
    body.append("name", name);
    for (const file of files) body.append("files", file);
    button.disabled = true;
    this.setAlert("");
    try {
      this.updated(await request(this.url, { method: "POST", body }));
      this.form.reset();
      const details = this.form.closest("details");
      details.open = false;
      details.querySelector("summary").focus();
    } catch (err) {
      this.setAlert(interpolate(gettext("“%(name)s” could not be created: %(detail)s"),
        { name, detail: err.message }, true));
    } finally {
      button.disabled = false;
    }
  }

  async addFiles(base, files) {
    if (!files.length) return;
    const body = new FormData();
    for (const file of files) body.append("files", file);
    this.uploading.add(base.id);
    this.setAlert("");
    this.render();
    try {
      const answer = await request(`${this.url}${base.id}/files`, { method: "POST", body });
      this.uploading.delete(base.id);
      this.updated(answer);
    } catch (err) {
      this.uploading.delete(base.id);
      this.render();
      this.setAlert(interpolate(gettext("Files could not be added to “%(name)s”: %(detail)s"),
        { name: base.name, detail: err.message }, true));
    }
  }

  // Only the bases that changed are built again, so that a poll every
  // second neither moves focus nor closes an open confirmation.
  render() {
    const old = new Map([...this.list.querySelectorAll(":scope > li.kb")].map((li) => [li.dataset.id, li]));
    const same = old.size === this.bases.length && this.bases.every((b) => old.has(String(b.id)));
    const focused = this.list.contains(document.activeElement)
      ? [document.activeElement.closest("li.kb")?.dataset.id, document.activeElement.dataset.role] : null;
    const items = this.bases.map((b) => {
      const li = old.get(String(b.id));
      return li && (li.classList.contains("confirming") || li.dataset.key === this.key(b)) ? li : this.item(b);
    });
    if (same) {
      this.bases.forEach((b, k) => { const li = old.get(String(b.id)); if (li !== items[k]) li.replaceWith(items[k]); });
    } else {
      this.list.replaceChildren(...items);
    }
    if (!this.bases.length) this.list.replaceChildren(el("li", "muted kb-empty", gettext("No knowledge bases yet.")));
    if (focused && !this.list.contains(document.activeElement)) this.focus(focused[0], focused[1]);
  }

  focus(id, role) {
    this.list.querySelector(`li.kb[data-id="${CSS.escape(String(id))}"] [data-role="${role}"]`)?.focus();
  }

  // What an item shows depends on: the base, whether it is ticked and whether files are on their way.
  key(base) { return JSON.stringify([base, this.chosen.has(base.id), this.uploading.has(base.id)]); }

  item(base) {
    const li = el("li", "kb");
    li.dataset.id = base.id;
    li.dataset.status = base.status;
    li.dataset.key = this.key(base);
    const statusId = `kb-status-${base.id}`;

    const pick = el("input", "kb-pick");
    pick.type = "checkbox";
    pick.id = `kb-pick-${base.id}`;
    pick.dataset.role = "pick";
    pick.checked = this.chosen.has(base.id);
    pick.disabled = base.status !== "ready";
    pick.setAttribute("aria-describedby", statusId);
    pick.addEventListener("change", () => {
      if (pick.checked) this.chosen.add(base.id); else this.chosen.delete(base.id);
      li.dataset.key = this.key(base);
      this.onChange();
    });
    const label = el("label", "kb-name", base.name);
    label.htmlFor = pick.id;

    const input = el("input");
    input.type = "file";
    input.multiple = true;
    input.accept = this.form.elements.files.accept;
    input.hidden = true;
    input.addEventListener("change", () => this.addFiles(base, [...input.files]));
    const actions = el("div", "kb-actions");
    const add = iconButton("upload", interpolate(gettext("Add files to “%(name)s”"), { name: base.name }, true),
      () => input.click());
    add.disabled = this.uploading.has(base.id);
    actions.append(
      add,
      iconButton("delete", interpolate(gettext("Delete “%(name)s”"), { name: base.name }, true),
        () => this.confirm(li, base)),
    );
    const row = el("div", "kb-row");
    row.append(pick, label, actions, input);

    const status = el("p", "kb-status", statusText(base, this.uploading.has(base.id)));
    status.id = statusId;
    if (base.embedding_model) status.title = interpolate(gettext("Embedding model: %(model)s"),
      { model: base.embedding_model }, true);
    li.append(row, status);
    if (base.status === "indexing") {
      const progress = el("progress", "kb-progress");
      progress.max = 1;
      progress.value = Math.min(1, Math.max(0, Number(base.progress) || 0));
      progress.setAttribute("aria-label", interpolate(gettext("Indexing “%(name)s”"), { name: base.name }, true));
      li.append(progress);
    }
    if (base.files?.length) li.append(this.files(base));
    return li;
  }

  files(base) {
    const failed = base.files.filter((f) => f.status === "error").length;
    const details = el("details", "kb-files");
    const summary = el("summary", "",
      interpolate(ngettext("%(n)s file", "%(n)s files", base.files.length), { n: base.files.length }, true));
    if (failed) {
      summary.append(" · ", el("span", "kb-files-failed",
        interpolate(ngettext("%(n)s failed", "%(n)s failed", failed), { n: failed }, true)));
    }
    // Open while something is wrong or still indexing, unless the user closed it.
    details.open = this.filesOpen.get(base.id) ?? (failed > 0 || base.status === "indexing");
    details.addEventListener("toggle", () => this.filesOpen.set(base.id, details.open));
    const list = el("ul");
    for (const file of base.files) {
      const li = el("li", "kb-file");
      li.dataset.status = file.status;
      li.append(el("span", "kb-file-name", file.name), el("span", "kb-file-state", fileText(file)));
      list.append(li);
    }
    details.append(summary, list);
    return details;
  }

  confirm(li, base) {
    const close = () => {
      li.classList.remove("confirming");
      li.dataset.key = ""; // built again
      this.render();
      this.focus(base.id, "delete");
    };
    const remove = async () => {
      try {
        await request(`${this.url}${base.id}/`, { method: "DELETE" });
      } catch (err) {
        close();
        this.setAlert(interpolate(gettext("“%(name)s” could not be deleted: %(detail)s"),
          { name: base.name, detail: err.message }, true));
        return;
      }
      this.bases = this.bases.filter((b) => b.id !== base.id);
      this.chosen.delete(base.id);
      li.remove();
      this.render();
      this.onChange();
      this.form.closest("details")?.querySelector("summary")?.focus();
    };
    confirmRow(li, {
      prefix: "kb", id: base.id, onYes: remove, onNo: close,
      message: interpolate(gettext("Delete “%(name)s” and its files?"), { name: base.name }, true),
    });
  }
}
