// Draws the page's charts and follows the server's event stream: each update replaces the main
// section and redraws the charts in place (Plotly.react keeps zoom and hidden traces).
(function () {
  "use strict";
  const body = document.body;
  function draw(charts) {
    const box = document.getElementById("charts");
    if (!box || typeof Plotly === "undefined") return;
    for (const c of charts) {
      let div = document.getElementById(c.id);
      if (!div) {
        div = document.createElement("div");
        div.id = c.id;
        div.className = "chart";
        div.dataset.kind = c.kind;
        div.dataset.contract = c.contract;
        box.appendChild(div);
      }
      Plotly.react(div, c.data, c.layout, {responsive: true, displaylogo: false, displayModeBar: false});
    }
  }
  function show(update) {
    if (update.html) document.getElementById("main").innerHTML = update.html;
    const status = document.getElementById("status");
    status.textContent = update.status;
    status.classList.toggle("problem", update.problem);
    draw(update.charts);
    body.dataset.version = update.version;
  }
  show(JSON.parse(document.getElementById("initial").textContent));
  const events = new EventSource("/events?page=" + body.dataset.page + "&p=" + body.dataset.p);
  events.addEventListener("update", function (ev) { show(JSON.parse(ev.data)); });
})();
