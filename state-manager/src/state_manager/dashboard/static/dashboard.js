// Exosphere state manager dashboard: small progressive enhancements over
// server-rendered pages. Every page works without it; with it, times show in
// local time, live pages refresh in place, and run-page panels load without
// a full navigation. No data is kept in the browser.
"use strict";

(function () {
  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) {
        el.title = el.getAttribute("datetime");
        el.textContent = when.toLocaleString();
      }
    });
  }

  var zoom = 1;
  function applyZoom() {
    var svg = document.getElementById("graph-svg");
    if (!svg) return;
    svg.setAttribute("width", Math.round(svg.dataset.width * zoom));
    svg.setAttribute("height", Math.round(svg.dataset.height * zoom));
  }

  function fetchPage(url) {
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.redirected && new URL(response.url).pathname === "/dashboard/login") {
          window.location.assign(response.url);  // the session ended: sign in again
          return null;
        }
        return response.text().then(function (text) {
          return new DOMParser().parseFromString(text, "text/html");
        });
      });
  }

  // Replace the live parts of this page by those of a freshly fetched one.
  function swap(doc) {
    if (!doc) return;
    var main = document.getElementById("main");
    var fresh = doc.getElementById("main");
    if (!main || !fresh) return;
    ["data-refresh-ms", "data-run-status"].forEach(function (name) {
      if (fresh.hasAttribute(name)) main.setAttribute(name, fresh.getAttribute(name));
      else main.removeAttribute(name);
    });
    main.querySelectorAll("[data-live], [data-live-panel]").forEach(function (el) {
      var other = doc.getElementById(el.id);
      if (other && other.innerHTML !== el.innerHTML) {
        el.innerHTML = other.innerHTML;
        localTimes(el);
      }
    });
    applyZoom();
  }

  var timer = null;
  function schedule() {
    clearTimeout(timer);
    var main = document.getElementById("main");
    var every = main && Number(main.getAttribute("data-refresh-ms"));
    if (!every) return;
    timer = setTimeout(function () {
      fetchPage(window.location.href).then(swap).catch(function () {}).then(schedule);
    }, every);
  }

  document.addEventListener("click", function (event) {
    var zoomButton = event.target.closest("[data-zoom]");
    if (zoomButton) {
      var step = Number(zoomButton.getAttribute("data-zoom"));
      zoom = step === 0 ? 1 : Math.min(3, Math.max(0.25, zoom * (step > 0 ? 1.25 : 0.8)));
      applyZoom();
      return;
    }
    var link = event.target.closest("a[data-panel]");
    if (link && !event.ctrlKey && !event.metaKey && !event.shiftKey && event.button === 0) {
      event.preventDefault();
      var href = link.getAttribute("href");
      fetchPage(href).then(function (doc) {
        window.history.pushState({}, "", href);
        swap(doc);
        schedule();
      });
    }
  });

  window.addEventListener("popstate", function () {
    fetchPage(window.location.href).then(swap);
  });

  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) event.preventDefault();
  });

  document.addEventListener("change", function (event) {
    var select = event.target;
    if (select.matches("select[data-autosubmit]")) {
      select.form.submit();
    } else if (select.id === "namespace-select") {
      var target = select.form.getAttribute("data-namespace-picker");
      var base = "/dashboard/namespaces/" + encodeURIComponent(select.value);
      window.location.assign(target === "runs" ? base + "/runs" : base);
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    schedule();
  });
})();
