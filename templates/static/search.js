// Neuron Atlas search: client-side, over window.ATLAS_SEARCH (written by the build as a script, so it
// works from file:// and from any subpath). Rows: [model, layer, unit, label, top class, flags, model title, url].
(function () {
  var MAX = 200;
  var input = document.getElementById('search-input');
  var list = document.getElementById('search-results');
  var status = document.getElementById('search-status');
  var form = document.getElementById('search-form');
  if (!input || !list || !window.ATLAS_SEARCH) return;
  var rows = window.ATLAS_SEARCH.rows;
  var root = (document.querySelector('a.brand') || {}).getAttribute ? document.querySelector('a.brand').getAttribute('href').replace(/index\.html$/, '') : '';
  var hay = rows.map(function (r) {
    return [r[0], r[1], String(r[2]), r[3], r[4], r[5], r[6]].join(' ').toLowerCase();
  });
  var words = rows.map(function (r) { return String(r[3]).toLowerCase().split(/[^a-z0-9]+/); });
  var FIELDS = {model: 0, layer: 1, unit: 2, label: 3, 'class': 4, flag: 5};

  function score(i, tokens) {
    var r = rows[i], total = 0;
    for (var t = 0; t < tokens.length; t++) {
      var tok = tokens[t], colon = tok.indexOf(':');
      var field = colon > 0 ? tok.slice(0, colon) : null;
      if (field !== null && FIELDS.hasOwnProperty(field)) {
        var want = tok.slice(colon + 1), have = String(r[FIELDS[field]]).toLowerCase();
        if (field === 'label' || field === 'flag' ? have.indexOf(want) < 0 : have !== want) return 0;
        total += 3;
        continue;
      }
      if (tok === (r[0] + '/' + r[1] + '/' + r[2]).toLowerCase()) { total += 100; continue; }
      if (/^\d+$/.test(tok)) {  // a number is a unit index, a class, or a whole word of the label, never part of a title
        var inLabel = words[i].indexOf(tok) >= 0;
        if (String(r[2]) !== tok && String(r[4]).toLowerCase() !== tok && !inLabel) return 0;
        total += 1 + (String(r[2]) === tok ? 3 : 0) + (String(r[4]).toLowerCase() === tok || inLabel ? 2 : 0);
        continue;
      }
      if (hay[i].indexOf(tok) < 0) return 0;
      total += 1;
      if (String(r[2]) === tok) total += 3;
      if (String(r[4]).toLowerCase() === tok) total += 2;
      if (r[0].toLowerCase() === tok || r[1].toLowerCase() === tok) total += 2;
    }
    return total;
  }

  function run() {
    var q = input.value.trim().toLowerCase();
    list.innerHTML = '';
    if (!q) { status.textContent = 'Type to search ' + rows.length + ' units.'; return; }
    var tokens = q.split(/\s+/), hits = [];
    for (var i = 0; i < rows.length; i++) {
      var s = score(i, tokens);
      if (s > 0) hits.push([s, i]);
    }
    hits.sort(function (a, b) { return b[0] - a[0] || a[1] - b[1]; });
    status.textContent = hits.length === 0 ? 'No unit matches.' :
      hits.length + ' unit' + (hits.length === 1 ? '' : 's') + (hits.length > MAX ? ', showing the first ' + MAX : '') + '.';
    hits.slice(0, MAX).forEach(function (h) {
      var r = rows[h[1]], li = document.createElement('li'), a = document.createElement('a');
      a.href = root + r[7];
      a.textContent = r[6] + ' · ' + r[1] + ' · unit ' + r[2];
      var note = document.createElement('span');
      note.className = 'muted';
      note.textContent = ' — ' + r[3] + (r[5] ? ' [' + r[5] + ']' : '');
      li.appendChild(a); li.appendChild(note); list.appendChild(li);
    });
  }

  var params = new URLSearchParams(window.location.search);
  if (params.get('q')) input.value = params.get('q');
  var timer = null;
  input.addEventListener('input', function () { clearTimeout(timer); timer = setTimeout(run, 80); });
  form.addEventListener('submit', function (ev) { ev.preventDefault(); run(); });
  run();
})();
