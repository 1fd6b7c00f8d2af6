"""GET / : a self-contained status page that refreshes itself from GET /dashboard.json."""

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
<div id="instances"></div>
<div id="publishers"></div>
<div id="status">loading...</div>
<script>
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
function render(d) {
  var workers = 0, html = "";
  d.instances.forEach(function (inst) {
    workers += inst.workers.length;
    html += '<h2 class="instance">' + esc(inst.instance_id) + '</h2>';
    html += '<p>chunks per location: <span class="locations">' + locs(inst.locations) + '</span></p>';
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
  var pubs = d.kv_event_publishers || [], ph = "";
  if (pubs.length) {
    ph = '<h2>KV-event publishers</h2><table><tr><th>instance</th><th>topic</th><th>dp rank</th>' +
         '<th>next seq</th><th>batches</th><th>gaps</th><th>replays</th><th>restarts</th><th>blocks</th>' +
         '<th>state</th></tr>';
    pubs.forEach(function (p) {
      ph += '<tr class="publisher"><td>' + esc(p.instance_id) + '</td><td>' + esc(p.topic) + '</td><td>' +
            p.dp_rank + '</td><td>' + p.next_seq + '</td><td>' + p.batches + '</td><td>' + p.gaps +
            '</td><td>' + p.replays + '</td><td>' + p.restarts + '</td><td>' + p.blocks + '</td><td class="' +
            (p.stale ? 'disconnected">stale: ' + esc(p.stale) : (p.replaying ? 'syncing">replaying' : 'live">live')) +
            '</td></tr>';
    });
    ph += '</table>';
  }
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
function refresh() {
  fetch("/dashboard.json", {cache: "no-store"})
    .then(function (r) { return r.json(); })
    .then(render)
    .catch(function (e) { document.getElementById("status").textContent = "controller unreachable: " + e; });
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""
