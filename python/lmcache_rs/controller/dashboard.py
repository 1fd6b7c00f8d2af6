"""GET / : a self-contained status page that refreshes itself from GET /dashboard.json.

No script or style comes from elsewhere (the machine may have no internet): the charts are
drawn on canvases by the few lines of JavaScript below. Each chart covers the last minutes of
``history`` (history.py, one point a second); each instance's holdings per tier are bars.
Every canvas, once drawn, says in ``data-points`` how many points it drew, in ``data-ink`` how
many of its pixels carry a series' colour and in ``data-rect`` where it is on the page (what the
browser test checks, against a screenshot too).
"""

DASHBOARD_HTML = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>lmcache_rs controller</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
 h1 { font-size: 1.3em; margin-bottom: 0.2em; }
 .summary span { display: inline-block; margin-right: 1.5em; }
 .summary b { font-size: 1.2em; }
 .charts { display: flex; flex-wrap: wrap; gap: 1em; margin: 1em 0; }
 .chart { border: 1px solid #ddd; padding: 0.3em 0.5em; }
 .chart h3 { font-size: 0.9em; margin: 0 0 0.2em; font-weight: normal; }
 .chart canvas { width: 320px; height: 120px; display: block; }
 .legend span { font-size: 0.8em; margin-right: 0.8em; }
 .bars { margin: 0.3em 0 0.8em; }
 .bar-row { display: flex; align-items: center; font-size: 0.85em; margin: 2px 0; }
 .bar-row .name { width: 10em; }
 .bar-row .track { width: 320px; background: #f3f3f3; margin-right: 0.5em; }
 .bar { height: 14px; }
 table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
 th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
 th { background: #f3f3f3; }
 .live { color: #080; } .syncing, .need_sync { color: #a60; } .disconnected { color: #b00; }
 #status { color: #888; font-size: 0.85em; }
</style>
</head>
<body>
<h1>lmcache_rs controller</h1>
<div class="summary">
 <span>instances <b id="n-instances">-</b></span>
 <span>workers <b id="n-workers">-</b></span>
 <span>chunks <b id="n-chunks">-</b></span>
 <span>lookups/s <b id="lookup-rate">-</b></span>
 <span>lookups <b id="n-lookups">-</b></span>
 <span>ingest keys/s <b id="ingest-rate">-</b></span>
</div>
<div class="charts" id="charts"></div>
<div id="instances"></div>
<div id="publishers"></div>
<div id="status">loading...</div>
<script>
var WINDOW_S = 300;
// name, title, series (history key, label, colour), fixed maximum (ratios) or null
var CHARTS = [
  ["lookups", "lookups / s", [["lookup_rate", "lookups/s", "#1f77b4"]], null],
  ["latency", "lookup latency (ms)", [["latency_p50_ms", "p50", "#2ca02c"], ["latency_p99_ms", "p99", "#d62728"]], null],
  ["hits", "hit ratio", [["hit_ratio", "lookups with a match", "#9467bd"],
                         ["token_hit_ratio", "matched / asked tokens", "#8c564b"]], 1],
  ["ingest", "ingest keys / s", [["ingest_rate", "keys/s", "#ff7f0e"]], null]
];
var TIER_COLOURS = {"GPU": "#17becf", "LocalCPUBackend": "#bcbd22", "LocalDiskBackend": "#7f7f7f"};
function esc(s) {
  return String(s).replace(/[&<>"']/g, function (c) {
    return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
  });
}
function locs(m) {
  var keys = Object.keys(m).sort();
  if (!keys.length) return "none";
  return keys.map(function (k) { return esc(k) + ": " + m[k]; }).join(", ");
}
function rgb(hex) {
  return [parseInt(hex.substr(1, 2), 16), parseInt(hex.substr(3, 2), 16), parseInt(hex.substr(5, 2), 16)];
}
function makeCharts() {
  var html = "";
  CHARTS.forEach(function (c) {
    html += '<div class="chart"><h3>' + esc(c[1]) + ' <b id="last-' + c[0] + '"></b></h3>' +
            '<canvas id="chart-' + c[0] + '" width="320" height="120"></canvas><div class="legend">' +
            c[2].map(function (s) { return '<span style="color:' + s[2] + '">&#9632; ' + esc(s[1]) + '</span>'; }).join("") +
            '</div></div>';
  });
  document.getElementById("charts").innerHTML = html;
}
function drawChart(c, h) {
  var canvas = document.getElementById("chart-" + c[0]);
  var ctx = canvas.getContext("2d"), w = canvas.width, ht = canvas.height, pad = 4;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, w, ht);
  var t = h.t || [], now = t.length ? t[t.length - 1] : 0, max = c[3] || 0;
  // the last WINDOW_S seconds, or less while the controller is younger: lines span the chart
  var span = t.length ? Math.min(WINDOW_S, Math.max(10, now - t[0])) : WINDOW_S;
  if (!c[3]) c[2].forEach(function (s) { (h[s[0]] || []).forEach(function (v) { if (v !== null && v > max) max = v; }); });
  if (!max) max = 1;
  ctx.strokeStyle = "#ccc";  // the frame and the half-way line
  ctx.lineWidth = 1;
  ctx.strokeRect(0.5, 0.5, w - 1, ht - 1);
  ctx.beginPath(); ctx.moveTo(0, ht / 2 + 0.5); ctx.lineTo(w, ht / 2 + 0.5); ctx.stroke();
  ctx.fillStyle = "#888";
  ctx.font = "10px sans-serif";
  ctx.fillText(String(+max.toPrecision(3)), 4, 11);
  var points = 0;
  c[2].forEach(function (s) {
    var values = h[s[0]] || [], open = false;
    ctx.strokeStyle = s[2];
    ctx.fillStyle = s[2];
    ctx.lineWidth = 2;
    ctx.beginPath();
    for (var i = 0; i < values.length; i++) {
      if (values[i] === null || values[i] === undefined) { open = false; continue; }
      if (now - t[i] > span) continue;
      var x = pad + (w - 2 * pad) * (1 - (now - t[i]) / span);
      var y = ht - pad - (ht - 2 * pad) * Math.min(values[i], max) / max;
      if (open) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      open = true;
      points++;
      ctx.fillRect(x - 1.5, y - 1.5, 3, 3);  // a lone point shows too
    }
    ctx.stroke();
  });
  // how much of the canvas the series painted: a check that the chart is not blank
  var data = ctx.getImageData(0, 0, w, ht).data, ink = 0, colours = c[2].map(function (s) { return rgb(s[2]); });
  for (var p = 0; p < data.length; p += 4) {
    for (var k = 0; k < colours.length; k++) {
      var col = colours[k];
      if (Math.abs(data[p] - col[0]) + Math.abs(data[p + 1] - col[1]) + Math.abs(data[p + 2] - col[2]) < 60) { ink++; break; }
    }
  }
  var r = canvas.getBoundingClientRect();
  canvas.setAttribute("data-points", points);
  canvas.setAttribute("data-ink", ink);
  canvas.setAttribute("data-rect", [r.left, r.top, r.width, r.height].map(Math.round).join(","));
  var last = c[2].map(function (s) { var v = (h[s[0]] || []).slice(-1)[0]; return v === null || v === undefined ? "-" : v; });
  document.getElementById("last-" + c[0]).textContent = last.join(" / ");
}
function bars(inst, max) {
  var keys = Object.keys(inst.locations).sort(), html = '<div class="bars">';
  keys.forEach(function (loc) {
    var n = inst.locations[loc], width = max ? Math.max(1, Math.round(300 * n / max)) : 0;
    html += '<div class="bar-row"><span class="name">' + esc(loc) + '</span><span class="track">' +
            '<div class="bar" data-location="' + esc(loc) + '" style="width:' + width + 'px;background:' +
            (TIER_COLOURS[loc] || "#aec7e8") + '"></div></span>' + n + ' chunks</div>';
  });
  return html + '</div>';
}
function render(d) {
  var workers = 0, html = "", max = 0;
  d.instances.forEach(function (inst) {
    Object.keys(inst.locations).forEach(function (k) { max = Math.max(max, inst.locations[k]); });
  });
  d.instances.forEach(function (inst) {
    workers += inst.workers.length;
    html += '<h2 class="instance">' + esc(inst.instance_id) + '</h2>';
    html += '<p>chunks per location: <span class="locations">' + locs(inst.locations) + '</span></p>';
    html += bars(inst, max);
    html += '<table><tr><th>worker</th><th>host</th><th>command port</th><th>p2p</th>' +
            '<th>state</th><th>last seen (s)</th><th>chunks</th></tr>';
    inst.workers.forEach(function (w) {
      html += '<tr class="worker"><td>' + w.worker_id + '</td><td>' + esc(w.host) + '</td><td>' +
              w.worker_port + '</td><td>' + esc(w.p2p) + '</td><td class="' + esc(w.state) + '">' +
              esc(w.state) + '</td><td>' + w.last_seen_s + '</td><td>' + locs(w.chunks) + '</td></tr>';
    });
    html += '</table>';
  });
  if (!d.instances.length) html = "<p>No workers registered.</p>";
  var pubs = d.kv_event_publishers || [], ph = "", now = Date.now(), seen = Object.create(null);
  if (pubs.length) {
    ph = '<h2>KV-event publishers</h2><table><tr><th>instance</th><th>topic</th><th>dp rank</th>' +
         '<th>next seq</th><th>batches</th><th>events</th><th>events/s</th><th>gaps</th><th>replays</th>' +
         '<th>restarts</th><th>blocks</th><th>state</th></tr>';
    pubs.forEach(function (p) {
      // events/s between this refresh and the last one that saw the publisher
      var last = eventsSeen[p.instance_id], rate = "-";
      if (last && now > last.at) rate = Math.max(0, Math.round((p.events - last.events) * 1000 / (now - last.at)));
      seen[p.instance_id] = {events: p.events, at: now};
      ph += '<tr class="publisher"><td>' + esc(p.instance_id) + '</td><td>' + esc(p.topic) + '</td><td>' +
            p.dp_rank + '</td><td>' + p.next_seq + '</td><td>' + p.batches + '</td><td>' + p.events +
            '</td><td class="rate">' + rate + '</td><td>' + p.gaps + '</td><td>' + p.replays + '</td><td>' +
            p.restarts + '</td><td>' + p.blocks + '</td><td class="' +
            (p.stale ? 'disconnected">stale: ' + esc(p.stale) : (p.replaying ? 'syncing">replaying' : 'live">live')) +
            '</td></tr>';
    });
    ph += '</table>';
    var skipped = d.kv_events_skipped || {}, reasons = Object.keys(skipped).sort();
    ph += '<p class="skipped">not applied: ' + (reasons.length ? reasons.map(function (r) {
      return esc(r) + ' ' + skipped[r]; }).join(", ") : "nothing") + '</p>';
  }
  eventsSeen = seen;
  CHARTS.forEach(function (c) { drawChart(c, d.history || {}); });
  document.getElementById("publishers").innerHTML = ph;
  document.getElementById("instances").innerHTML = html;
  document.getElementById("n-instances").textContent = d.instances.length;
  document.getElementById("n-workers").textContent = workers;
  document.getElementById("n-chunks").textContent = d.chunks;
  document.getElementById("lookup-rate").textContent = d.lookup_rate;
  document.getElementById("n-lookups").textContent = d.lookups;
  document.getElementById("ingest-rate").textContent = d.ingest_rate;
  document.getElementById("status").textContent =
      "updated " + new Date().toLocaleTimeString() + " - up " + d.uptime_s + " s - chunk size " + d.chunk_size;
}
// instance -> {events, at}: the last refresh's counts, for events/s (ids come from the wire:
// no prototype to collide with)
var eventsSeen = Object.create(null);
function refresh() {
  fetch("/dashboard.json", {cache: "no-store"})
    .then(function (r) { return r.json(); })
    .then(render)
    .catch(function (e) { document.getElementById("status").textContent = "controller unreachable: " + e; });
}
makeCharts();
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""
