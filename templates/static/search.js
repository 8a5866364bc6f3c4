// Neuron Atlas search: client-side, over window.ATLAS_SEARCH (written by the build as a script, so it
// works from file:// and from any subpath). The index is columnar (website.search_index): string tables
// models [[model, title]], labels, classes, flags, tokens, and one run per layer,
// [model code, layer, layer folder, units (n for 0..n-1, or their list), label codes, class codes, flag codes,
// label scores (null: none), token codes]. A text atlas's unit's tokens: the ones it fires on most often,
// space-separated, whitespace shown (a space is ·); "" for images.
// A unit's page is <layer folder>/<unit>/index.html from the site root.
// Each query word is matched once per distinct string (per run, label, class, flag), then per unit by code,
// so tens of thousands of units take a few milliseconds.
(function () {
  var MAX = 200;
  var input = document.getElementById('search-input');
  var list = document.getElementById('search-results');
  var status = document.getElementById('search-status');
  var form = document.getElementById('search-form');
  if (!input || !list || !window.ATLAS_SEARCH) return;
  var index = window.ATLAS_SEARCH;
  var root = (document.querySelector('a.brand') || {}).getAttribute ? document.querySelector('a.brand').getAttribute('href').replace(/index\.html$/, '') : '';
  var lower = function (s) { return String(s).toLowerCase(); };
  var labels = index.labels, classes = index.classes, flags = index.flags;
  var labelsLow = labels.map(lower), classesLow = classes.map(lower), flagsLow = flags.map(lower);
  var labelWords = labelsLow.map(function (l) { return l.split(/[^a-z0-9]+/); });
  var tokens = index.tokens || [''];
  var tokenLists = tokens.map(function (t) { return t ? lower(t).split(' ') : []; });
  var total = 0;
  var runs = index.layers.map(function (l) {
    var model = index.models[l[0]], units = typeof l[3] === 'number' ? null : l[3];
    var run = {model: model[0], title: model[1], layer: l[1], dir: l[2], units: units, n: units ? units.length : l[3],
               label: l[4], cls: l[5], flag: l[6], score: l[7] || [], tok: l[8] || [], first: total};
    run.modelLow = lower(run.model); run.layerLow = lower(run.layer); run.titleLow = lower(run.title);
    run.idPrefix = lower(run.model + '/' + run.layer + '/');
    total += run.n;
    return run;
  });
  var FIELDS = {model: 0, layer: 1, unit: 2, label: 3, 'class': 4, flag: 5, score: 6, token: 7};
  // a token as typed ("token: def" in quotes keeps its space) as the index shows it: a space is ·
  function shownToken(t) { return t.replace(/ /g, '\u00b7').replace(/\n/g, '\u21b5').replace(/\t/g, '\u2192'); }
  // for each token list: 5 when its first (most frequent) token is `want`, 4 when another is, 3 when one
  // contains it, else 0
  function tokenMatch(want) {
    return tokenLists.map(function (list) {
      var best = 0;
      list.forEach(function (t, i) { best = Math.max(best, t === want ? (i ? 4 : 5) : t.indexOf(want) >= 0 ? 3 : 0); });
      return best;
    });
  }

  function has(table, test) { return table.map(test); }

  // One query word as a scorer: scorer.run(run) gives f(k, unit) -> its score for the run's k-th unit, 0 if it
  // does not match. Fields: model:, layer:, unit: and class: must be equal, label: and flag: contained, score:
  // compared (>, >=, <, <=, =) with the label's score (3 each); token: one of the tokens it fires on most often
  // is it (5 the first, 4 another) or contains it (3), e.g. token:" def" or token:·def;
  // model/layer/unit opens that unit (100); a number is a unit index, a class, or a whole word of the label;
  // any other word must occur in the model, layer, unit, label, class, flags or model title.
  function scorer(tok) {
    var colon = tok.indexOf(':');
    var field = colon > 0 ? tok.slice(0, colon) : null;
    if (field !== null && FIELDS.hasOwnProperty(field)) {
      var want = tok.slice(colon + 1);
      if (field === 'token') {
        var byTokens = tokenMatch(shownToken(want));
        return {run: function (r) { return function (k) { return byTokens[r.tok[k]] || 0; }; }};
      }
      var ok = field === 'label' ? has(labelsLow, function (h) { return h.indexOf(want) >= 0; })
        : field === 'flag' ? has(flagsLow, function (h) { return h.indexOf(want) >= 0; })
        : field === 'class' ? has(classesLow, function (h) { return h === want; }) : null;
      if (field === 'score') {  // score:>0.9, score:<=0.5, score:0.75 (equal, to its 2 decimals)
        var m = want.match(/^(>=|<=|>|<|=)?(-?[0-9]*\.?[0-9]+)$/), op = m ? (m[1] || '=') : null, x = m ? +m[2] : 0;
        var test = function (v) {
          return v !== null && v !== undefined && (op === '>' ? v > x : op === '>=' ? v >= x : op === '<' ? v < x
            : op === '<=' ? v <= x : op === '=' ? Math.abs(v - x) < 1e-9 : false);
        };
        return {run: function (r) { return function (k) { return test(r.score[k]) ? 3 : 0; }; }};
      }
      return {run: function (r) {
        if (field === 'model' || field === 'layer') {
          var pass = (field === 'model' ? r.modelLow : r.layerLow) === want ? 3 : 0;
          return function () { return pass; };
        }
        if (field === 'unit') return function (k, u) { return String(u) === want ? 3 : 0; };
        var codes = field === 'label' ? r.label : field === 'flag' ? r.flag : r.cls;
        return function (k) { return ok[codes[k]] ? 3 : 0; };
      }};
    }
    var digits = /^\d+$/.test(tok);
    var classEq = has(classesLow, function (h) { return h === tok; });
    if (digits) {
      var inLabel = has(labelWords, function (w) { return w.indexOf(tok) >= 0; });
    } else {
      var inLabelText = has(labelsLow, function (h) { return h.indexOf(tok) >= 0; });
      var inClass = has(classesLow, function (h) { return h.indexOf(tok) >= 0; });
      var inFlags = has(flagsLow, function (h) { return h.indexOf(tok) >= 0; });
      var inTokens = tokenMatch(shownToken(tok));
    }
    return {run: function (r) {
      // the unit's id: only where the word starts with this run's model/layer/
      var idUnit = tok.indexOf(r.idPrefix) === 0 ? tok.slice(r.idPrefix.length) : null;
      var rest;
      if (digits) {
        rest = function (k, u) {
          var unitEq = String(u) === tok, word = inLabel[r.label[k]], cls = classEq[r.cls[k]];
          if (!unitEq && !cls && !word) return 0;
          return 1 + (unitEq ? 3 : 0) + (cls || word ? 2 : 0);
        };
      } else {
        // (a word that is not all digits never equals, nor occurs in, a unit index)
        var inRun = r.modelLow.indexOf(tok) >= 0 || r.layerLow.indexOf(tok) >= 0 || r.titleLow.indexOf(tok) >= 0;
        var bonus = r.modelLow === tok || r.layerLow === tok ? 2 : 0;
        rest = function (k) {
          var c = r.cls[k];
          if (!inRun && !inLabelText[r.label[k]] && !inClass[c] && !inFlags[r.flag[k]] && !inTokens[r.tok[k]]) return 0;
          return 1 + (classEq[c] ? 2 : 0) + bonus;
        };
      }
      if (idUnit === null) return rest;
      return function (k, u) { return String(u) === idUnit ? 100 : rest(k, u); };
    }};
  }

  function run() {
    var q = input.value.trim().toLowerCase();
    list.innerHTML = '';
    if (!q) { status.textContent = 'Type to search ' + total + ' units.'; return; }
    // words; a quoted part keeps its spaces ("token: def" in quotes, or a quoted phrase), its quotes dropped
    var words = q.match(/[^\s"]*"[^"]*"?|\S+/g).map(function (w) { return w.replace(/"/g, ''); });
    var scorers = words.filter(function (w) { return w.length; }).map(scorer), hits = [];
    runs.forEach(function (r, ri) {
      var fs = scorers.map(function (s) { return s.run(r); });
      for (var k = 0; k < r.n; k++) {
        var u = r.units ? r.units[k] : k, s = 0;
        for (var t = 0; t < fs.length; t++) {
          var v = fs[t](k, u);
          if (!v) { s = 0; break; }
          s += v;
        }
        if (s > 0) hits.push([s, r.first + k, ri, k]);
      }
    });
    hits.sort(function (a, b) { return b[0] - a[0] || a[1] - b[1]; });
    status.textContent = hits.length === 0 ? 'No unit matches.' :
      hits.length + ' unit' + (hits.length === 1 ? '' : 's') + (hits.length > MAX ? ', showing the first ' + MAX : '') + '.';
    var frag = document.createDocumentFragment();
    hits.slice(0, MAX).forEach(function (h) {
      var r = runs[h[2]], k = h[3], u = r.units ? r.units[k] : k, f = flags[r.flag[k]];
      var li = document.createElement('li'), a = document.createElement('a');
      a.href = root + r.dir + '/' + u + '/index.html';
      a.textContent = r.title + ' · ' + r.layer + ' · unit ' + u;
      var note = document.createElement('span');
      note.className = 'muted';
      var sc = r.score[k];
      var often = tokens[r.tok[k]];
      note.textContent = ' — ' + labels[r.label[k]] + (sc !== null && sc !== undefined ? ' (score ' + sc + ')' : '')
        + (often ? ' · often on ' + often : '') + (f ? ' [' + f + ']' : '');
      li.appendChild(a); li.appendChild(note); frag.appendChild(li);
    });
    list.appendChild(frag);
  }

  var params = new URLSearchParams(window.location.search);
  if (params.get('q')) input.value = params.get('q');
  var timer = null;
  input.addEventListener('input', function () { clearTimeout(timer); timer = setTimeout(run, 80); });
  form.addEventListener('submit', function (ev) { ev.preventDefault(); run(); });
  run();
})();
