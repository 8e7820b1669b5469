// Keeps the requests table current without a full reload: every few seconds the counts and the
// table are fetched again and swapped in, unless the operator is working inside them.
(function () {
  "use strict";
  var live = document.querySelector("[data-live]");
  if (!live) return;
  var seconds = Number(live.getAttribute("data-refresh-seconds")) || 15;

  function busy() {
    return document.hidden || live.contains(document.activeElement);
  }

  function refresh() {
    if (busy()) return;
    fetch(live.getAttribute("data-live"), {
      credentials: "same-origin",
      headers: { "X-Dashboard-Page": location.pathname + location.search },
    }).then(function (response) {
      if (response.redirected || !response.ok) {
        // Logged out or expired: let the page itself go to the login form.
        location.reload();
        return null;
      }
      return response.text();
    }).then(function (html) {
      if (html !== null && html !== undefined && !busy()) {
        live.innerHTML = html;
      }
    }).catch(function () { /* offline for a moment: try again next time */ });
  }

  setInterval(refresh, seconds * 1000);
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) refresh();
  });
})();
