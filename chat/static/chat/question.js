// One of the user's own messages on the page: its text and, once the
// server's id for it is known, its translations (translate.js). A message
// just sent learns its id when its reply has ended (chat.js): chat.accepted
// names the reply only.
import { el } from "./util.js";

export class Question {
  constructor({ content, translations, clientId = null }) {
    this.clientId = clientId;
    this.translations = translations;
    this.li = el("li", "msg user");
    this.actions = el("div", "msg-actions");
    this.actions.append(translations.group);
    this.actions.hidden = true;
    this.li.append(el("p", "msg-who visually-hidden", gettext("You")), el("div", "msg-body plain", content),
      translations.list, this.actions);
  }

  get id() { return this.translations.id; }

  // The stored message: now it can be translated.
  stored(message) {
    this.translations.restore(message.translations);
    this.actions.hidden = false;
  }
}
