// The console's only script (the page's Content-Security-Policy allows no other): a saga's page follows the saga
// live over server-sent events, and forms of drastic actions ask before they are sent.
"use strict";

(function () {
  function confirmDrastic(event) {
    const form = event.target;
    const text = (event.submitter && event.submitter.dataset.confirm) || form.dataset.confirm;
    if (text && !window.confirm(text)) {
      event.preventDefault();
    }
  }

  function follow(root) {
    const indicator = document.getElementById("live-indicator");
    const head = () => document.getElementById("part-head");
    if (!head() || head().dataset.ended === "yes") {
      return;
    }
    let refreshing = false;
    let again = false;
    let source = null;

    function say(state, text) {
      if (indicator) {
        indicator.dataset.state = state;
        indicator.textContent = text;
      }
    }

    // A part being edited (a reason typed, a payload) is left alone until its form is sent or left.
    function editing(part) {
      return part.dataset.dirty === "yes" || part.contains(document.activeElement);
    }

    async function refresh() {
      if (refreshing) {
        again = true;
        return;
      }
      refreshing = true;
      try {
        const answer = await fetch(root.dataset.liveUrl, { headers: { accept: "text/html" }, credentials: "same-origin" });
        if (answer.ok) {
          const fresh = new DOMParser().parseFromString(await answer.text(), "text/html");
          for (const part of fresh.querySelectorAll("[data-part]")) {
            const old = document.getElementById(part.id);
            if (old && !(old.hasAttribute("data-keep-while-editing") && editing(old))) {
              old.replaceWith(document.importNode(part, true));
            }
          }
          if (head() && head().dataset.ended === "yes") {
            say("ended", "ended: nothing more will happen");
            if (source) {
              source.close();
            }
          }
        }
      } finally {
        refreshing = false;
        if (again) {
          again = false;
          refresh();
        }
      }
    }

    document.addEventListener("input", (event) => {
      const part = event.target.closest && event.target.closest("[data-keep-while-editing]");
      if (part) {
        part.dataset.dirty = "yes";
      }
    });

    const after = head().dataset.lastSeq || "0";
    source = new EventSource(root.dataset.eventsUrl + "?after=" + encodeURIComponent(after));
    source.addEventListener("open", () => say("live", "live: the page follows the saga as it moves"));
    source.addEventListener("history", (event) => {
      const data = JSON.parse(event.data);
      say("live", "live: " + data.type + (data.step ? " " + data.step : "") + ", " + data.status);
      refresh();
    });
    source.addEventListener("problem", (event) => {
      say("problem", "live updates interrupted: " + JSON.parse(event.data).message);
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CONNECTING) {
        say("problem", "live updates interrupted: reconnecting…");
      }
    });
    source.addEventListener("end", async () => {
      source.close();
      await refresh();
      if (head() && head().dataset.ended !== "yes") {
        say("problem", "no longer following: the orchestrator ended the stream; reload to follow again");
      }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    // On the document, so the forms a live refresh puts in place ask too.
    document.addEventListener("submit", confirmDrastic);
    const root = document.getElementById("saga");
    if (root) {
      follow(root);
    }
  });
})();
