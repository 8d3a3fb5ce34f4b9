// The consent dashboard's one script: live updates. The app relays the vault server's word that
// something new is on the customer's chain (a request, a read, an append); the page then fetches
// itself again from the app, which verifies everything as usual. A form being filled in is never
// replaced: a notice says instead. Nor is a page whose form was just sent (the app is answering it,
// and the refresh would take the answer's message meant for the next page), and a refresh keeps the
// message the page shows (the action's own entry is often what triggers the refresh).
"use strict";
(function () {
  const live = document.getElementById("live");
  let dirty = false;
  document.addEventListener("input", () => { dirty = true; });
  document.addEventListener("submit", () => { dirty = true; });
  const say = (text) => { live.textContent = text; setTimeout(() => { live.textContent = ""; }, 8000); };
  async function refresh(what) {
    const main = document.getElementById("main");
    if (dirty || main.dataset.live !== "true") { say("Something new in your vault (" + what + "): reload the page to see it."); return; }
    const res = await fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } });
    if (!res.ok) { return; }
    const doc = new DOMParser().parseFromString(await res.text(), "text/html");
    const fresh = doc.getElementById("main");
    if (fresh) {
      // Only an action's message: a page that could not be shown is replaced with its error.
      const shown = main.querySelector(':scope > h1 + [data-message="action"]');
      const title = fresh.querySelector(":scope > h1");
      if (shown && title && !fresh.querySelector('[data-message="action"]')) { title.after(shown); }
      main.replaceWith(fresh);
    }
    say("Updated: " + what + ".");
  }
  if (window.EventSource) {
    const events = new EventSource("/events");
    events.addEventListener("change", () => { refresh("a new entry in your vault").catch(() => {}); });
  }
})();
