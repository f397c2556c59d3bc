// The console's entry point: tabs, the API key dialog, and the two panels.

import { AuthError, apiKey, keyRequired, setApiKey } from "./api.js";
import { Chat } from "./chat.js";
import { Dashboard } from "./dashboard.js";

const $ = (id) => document.getElementById(id);

function setStatus(text, isError = false) {
  const status = $("server-status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function askForKey(refused) {
  const dialog = $("key-dialog");
  $("key-error").hidden = !refused;
  $("key-input").value = "";
  if (!dialog.open) dialog.showModal();
}

async function loadModels(chat) {
  try {
    const models = await chat.loadModels();
    setStatus(`${models.length} model${models.length === 1 ? "" : "s"} served`);
  } catch (error) {
    setStatus(error.message, true);
    if (error instanceof AuthError) askForKey(Boolean(apiKey()));
  }
}

function showTab(name, dashboard) {
  for (const button of document.querySelectorAll("[data-tab]")) {
    const selected = button.dataset.tab === name;
    button.setAttribute("aria-selected", String(selected));
    $(button.dataset.tab).hidden = !selected;
  }
  if (name === "dashboard") dashboard.start();
  else dashboard.stop();
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

async function main() {
  const onAuthError = () => askForKey(Boolean(apiKey()));
  const chat = new Chat(onAuthError);
  const dashboard = new Dashboard(onAuthError);
  for (const button of document.querySelectorAll("[data-tab]")) {
    button.addEventListener("click", () => showTab(button.dataset.tab, dashboard));
  }
  $("key-button").addEventListener("click", () => askForKey(false));
  $("key-dialog").addEventListener("close", () => {
    const choice = $("key-dialog").returnValue;
    if (choice === "save") setApiKey($("key-input").value.trim());
    if (choice === "clear") setApiKey("");
    if (choice) loadModels(chat);
  });
  showTab(location.hash === "#dashboard" ? "dashboard" : "chat", dashboard);
  try {
    if (!apiKey() && (await keyRequired())) {
      setStatus("API key needed", true);
      askForKey(false);
      return;
    }
  } catch (error) {
    setStatus(`server unreachable: ${error.message}`, true);
    return;
  }
  await loadModels(chat);
}

main();
