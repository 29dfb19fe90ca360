// Argon console: small progressive enhancements. Every page works without this file, except
// copying to the clipboard and revealing a password.
"use strict";

document.documentElement.classList.add("js");

// Copy text, on plain http too: navigator.clipboard needs a secure context, execCommand does not.
async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (err) {
      // fall through to the textarea method (e.g. permission denied)
    }
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen-copy";
  document.body.appendChild(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } finally {
    area.remove();
  }
  return ok;
}

function setupCopyButtons() {
  for (const button of document.querySelectorAll("[data-copy]")) {
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      const text = "value" in source ? source.value : source.textContent;
      const label = button.textContent;
      button.textContent = (await copyText(text)) ? "Copied" : "Press Ctrl+C";
      setTimeout(() => { button.textContent = label; }, 1600);
    });
  }
}

function setupReveal() {
  for (const button of document.querySelectorAll("[data-reveal]")) {
    const box = button.closest("[data-snippets]");
    button.addEventListener("click", () => {
      const revealed = box.classList.toggle("revealed");
      button.setAttribute("aria-pressed", String(revealed));
      button.textContent = revealed ? "Hide password" : "Reveal password";
    });
  }
}

// Selects of the Connection Details form reload the widget; "Show as" only switches panels.
function setupChoices() {
  for (const form of document.querySelectorAll("form[data-autosubmit]")) {
    form.addEventListener("change", (event) => {
      if (event.target.matches("[data-local]")) {
        showSnippet(event.target.value);
      } else {
        form.requestSubmit();
      }
    });
  }
}

function showSnippet(key) {
  for (const panel of document.querySelectorAll("[data-snippet]")) {
    panel.hidden = panel.dataset.snippet !== key;
  }
  const url = new URL(window.location.href);
  url.searchParams.set("snippet", key);
  history.replaceState(null, "", url);
}

// The compute card's live indicator: poll the state every 3 seconds while the page is visible.
function setupComputePolling() {
  const card = document.querySelector("[data-compute-url]");
  if (!card) return;
  const badge = card.querySelector("[data-compute-state]");
  const label = card.querySelector("[data-compute-label]");
  const lastActive = card.querySelector("[data-compute-last-active]");
  async function refresh() {
    if (document.hidden) return;
    try {
      const response = await fetch(card.dataset.computeUrl, { headers: { Accept: "application/json" } });
      if (!response.ok) {
        label.textContent = response.status === 401 ? "Signed out — reload" : "Unknown";
        return;
      }
      const compute = await response.json();
      badge.className = "state state-" + compute.state;
      label.textContent = compute.label;
      if (lastActive) lastActive.textContent = compute.last_active;
      for (const button of card.querySelectorAll("[data-compute-action]")) {
        const active = compute.state === "active";
        button.disabled = button.dataset.computeAction === "start" ? active : !active;
      }
    } catch (err) {
      label.textContent = "Server unreachable";
    }
  }
  setInterval(refresh, 3000);
}

setupCopyButtons();
setupReveal();
setupChoices();
setupComputePolling();

// The SQL editor: Ctrl+Enter (or Cmd+Enter) runs the query.
function setupSqlEditor() {
  for (const form of document.querySelectorAll("form[data-sql-form]")) {
    const area = form.querySelector("textarea");
    area.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
  }
}

setupSqlEditor();

// On a phone the project tabs scroll sideways: bring the current one into view.
function revealCurrentTab() {
  const current = document.querySelector(".tabs [aria-current='page']");
  if (!current) return;
  const bar = current.parentElement;
  if (bar.scrollWidth > bar.clientWidth) {
    bar.scrollLeft = current.offsetLeft - (bar.clientWidth - current.offsetWidth) / 2;
  }
}

revealCurrentTab();
