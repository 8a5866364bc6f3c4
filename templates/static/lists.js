// Neuron Atlas unit lists (lists.html): the units named in the page's fragment, #model/layer/unit,model/layer/unit
// (each id URI-encoded but for its slashes), else the list kept in this browser (localStorage "atlas-list", a JSON
// array of ids: static/atlas.js owns it, as window.AtlasList, and its "Add to list" on unit pages writes it). No
// server: the search index (window.ATLAS_SEARCH, see website.search_index) resolves an id to its folder,
// <layer folder>/<unit>/, and its label; each unit's data.json there gives the rest (paths in it are relative to
// it). Shown: a card per unit, the histograms overlaid as densities on one axis, and per model the units'
// activations on the model's seeded sample ("sample": {examples, values}), one plot per model since only its
// units share those inputs.
// Every text is set with textContent and every SVG node made with createElementNS: no data is parsed as HTML.
(() => {
  const app = document.getElementById('lists-app');
  const index = window.ATLAS_SEARCH;
  if (!app || !index || !window.AtlasList) return;
  app.hidden = false;

  const MAX = 40;  // units shown at most (a longer list is cut, and says so)
  const SVG = 'http://www.w3.org/2000/svg';
  // distinct on white, each at least 4.5:1 against it; the marker shape changes too, for who cannot tell them apart
  const COLOURS = ['#1f6feb', '#d1242f', '#1a7f37', '#8250df', '#bc4c00', '#0a7b83', '#bf3989', '#57606a',
                   '#7d4e00', '#3e4b9e'];
  const SHAPES = ['circle', 'square', 'triangle', 'diamond'];
  const $ = id => document.getElementById(id);
  const el = {
    status: $('lists-status'), empty: $('lists-empty'), example: $('lists-example'), exampleWrap: $('lists-example-wrap'),
    file: $('lists-file'), share: $('lists-share'), link: $('lists-link'), copy: $('lists-copy'), save: $('lists-save'),
    copyStatus: $('lists-copy-status'), missing: $('lists-missing'), cards: $('lists-cards'),
    hist: $('lists-histograms'), histFigure: $('lists-hist-figure'), sample: $('lists-sample'),
    plots: $('lists-sample-plots'), rescale: $('lists-rescale'), peak: $('lists-peak'),
  };
  const brand = document.querySelector('a.brand');
  const home = new URL(brand ? brand.getAttribute('href') : 'index.html', document.baseURI);  // the site's root
  const offline = location.protocol === 'file:';  // Chromium and Firefox refuse fetch() of file:// URLs

  // ------------------------------------------------------------------ the index: id -> unit

  const titles = new Map(index.models.map(m => [m[0], m[1]]));
  const runs = new Map();  // model + '\n' + layer -> [{dir, units, n, label, flag}] (a layer may take several runs)
  index.layers.forEach(l => {
    const key = index.models[l[0]][0] + '\n' + l[1];
    const units = typeof l[3] === 'number' ? null : l[3];
    if (!runs.has(key)) runs.set(key, []);
    runs.get(key).push({dir: l[2], units, n: units ? units.length : l[3], label: l[4], flag: l[6]});
  });

  function lookup(id) {
    // model/layer/unit: the model has no slash and the unit is a number, so split at the first and the last one
    const first = id.indexOf('/'), last = id.lastIndexOf('/');
    if (first <= 0 || last <= first + 1 || !/^\d+$/.test(id.slice(last + 1))) return null;
    const model = id.slice(0, first), layer = id.slice(first + 1, last), unit = +id.slice(last + 1);
    for (const run of runs.get(model + '\n' + layer) || []) {
      const k = run.units ? run.units.indexOf(unit) : (unit < run.n ? unit : -1);
      if (k < 0) continue;
      const folder = new URL(run.dir + '/' + unit + '/', home);
      const flags = index.flags[run.flag[k]];
      return {id, model, layer, unit, title: titles.get(model) || model, label: index.labels[run.label[k]],
              flags: flags ? flags.split(' ') : [], page: new URL('index.html', folder).href,
              json: new URL('data.json', folder).href};
    }
    return null;
  }

  function firstIds(count) {  // a few ids of this atlas, for the example link: the first unit of different layers
    const out = [];
    for (const [key, list] of runs) {
      if (out.length >= count) break;
      const [model, layer] = key.split('\n');
      const run = list[0];
      if (run.n) out.push(model + '/' + layer + '/' + (run.units ? run.units[0] : 0));
    }
    return out;
  }

  // ------------------------------------------------------------------ the list: fragment and storage

  const fragment = AtlasList.fragment;

  function parseHash(hash) {
    const seen = new Set(), ids = [];
    hash.replace(/^#/, '').split(',').forEach(part => {
      let id = part;
      try { id = decodeURIComponent(part); } catch (e) { /* a stray %: keep it as written */ }
      id = id.trim();
      if (id && !seen.has(id)) { seen.add(id); ids.push(id); }
    });
    return ids;
  }

  const loadStored = AtlasList.load;  // null where storage is refused
  const saveStored = AtlasList.save;

  const same = (a, b) => a.length === b.length && a.every((v, i) => v === b[i]);

  // ------------------------------------------------------------------ helpers

  function node(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return '–';
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return String(Number(v.toPrecision(3)));
  }

  function ticks(lo, hi, count) {  // round numbers between lo and hi, about `count` of them
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(f => f * mag).find(s => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    return out;
  }

  function marker(shape, x, y, r, attrs) {
    let e;
    if (shape === 'circle') e = svg('circle', {cx: x, cy: y, r});
    else if (shape === 'square') e = svg('rect', {x: x - r * .85, y: y - r * .85, width: r * 1.7, height: r * 1.7});
    else if (shape === 'triangle') e = svg('polygon', {points: `${x},${y - r * 1.1} ${x + r},${y + r * .7} ${x - r},${y + r * .7}`});
    else e = svg('polygon', {points: `${x},${y - r * 1.2} ${x + r * 1.1},${y} ${x},${y + r * 1.2} ${x - r * 1.1},${y}`});
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }

  function key(unit) {  // the unit's colour and marker, as a small picture (legends and cards)
    const s = svg('svg', {class: 'lists-key', viewBox: '0 0 24 12', width: 24, height: 12, 'aria-hidden': 'true'});
    s.appendChild(svg('line', {x1: 1, x2: 23, y1: 6, y2: 6, stroke: unit.colour, 'stroke-width': 2}));
    s.appendChild(marker(unit.shape, 12, 6, 3.6, {fill: unit.colour, stroke: '#fff', 'stroke-width': 1}));
    return s;
  }

  function legend(units, note) {
    const ul = node('ul', 'lists-legend');
    units.forEach(u => {
      const li = node('li');
      li.appendChild(key(u));
      li.appendChild(node('code', '', u.id));
      const extra = note && note(u);
      if (extra) li.appendChild(node('span', 'muted', ' ' + extra));
      ul.appendChild(li);
    });
    return ul;
  }

  function idCode(id) {  // a unit id as <code>, breakable after its slashes (and the dots of its layer)
    const code = node('code');
    id.replace(/[/.]/g, '$&\n').split('\n').forEach((part, i) => {
      if (i) code.appendChild(document.createElement('wbr'));
      code.appendChild(document.createTextNode(part));
    });
    return code;
  }

  const cache = new Map();  // data.json URL -> promise of {data} or {error}
  function load(unit) {
    if (!cache.has(unit.json)) {
      cache.set(unit.json, fetch(unit.json)
        .then(r => { if (!r.ok) throw new Error('HTTP ' + r.status); return r.json(); })
        .then(data => ({data}), error => ({error: String(error && error.message || error)})));
    }
    return cache.get(unit.json);
  }

  // ------------------------------------------------------------------ the page

  let current = [], source = 'link', generation = 0, shown = [], focusAfter = null;

  function remove(id, position) {
    const ids = current.filter(x => x !== id);
    focusAfter = position;
    if (source === 'link') {
      location.hash = fragment(ids);  // (a new history entry: Back brings the unit back) -> hashchange -> render
    } else {
      saveStored(ids);
      render();
    }
  }

  function shareLink(ids) {
    return location.href.split('#')[0] + (ids.length ? '#' + fragment(ids) : '');
  }

  function render() {
    const gen = ++generation;
    const fromHash = parseHash(location.hash);
    const stored = loadStored();
    source = fromHash.length ? 'link' : 'stored';
    current = fromHash.length ? fromHash : (stored || []);
    const ids = current.slice(0, MAX);
    const units = [], missing = [];
    ids.forEach(id => {
      const u = lookup(id);
      if (u) units.push(u); else missing.push(id);
    });
    units.forEach((u, i) => { u.colour = COLOURS[i % COLOURS.length]; u.shape = SHAPES[i % SHAPES.length]; });
    shown = units;

    // status, the empty state and the link
    const n = current.length, plural = n === 1 ? '' : 's';
    el.status.textContent = source === 'link'
      ? `${n} unit${plural} from this page's address${n > MAX ? `, showing the first ${MAX}` : ''}.`
      : stored === null ? 'This browser does not let the page keep a list (a private window?): list units in the address instead.'
      : n ? `Your list, kept in this browser: ${n} unit${plural}${n > MAX ? `, showing the first ${MAX}` : ''}.` : '';
    el.status.hidden = !el.status.textContent;
    el.empty.hidden = n > 0;
    const examples = firstIds(2);
    el.exampleWrap.hidden = !examples.length;
    if (examples.length) {
      el.example.href = '#' + fragment(examples);
      el.example.textContent = 'lists.html#' + fragment(examples);
    }
    el.share.hidden = n === 0;
    el.link.value = shareLink(current);
    el.copyStatus.textContent = '';
    el.save.hidden = !(source === 'link' && stored !== null && !same(stored, current));
    el.file.hidden = !(offline && units.length);

    // ids that are not units of this atlas
    const ul = el.missing.querySelector('ul');
    ul.textContent = '';
    missing.forEach(id => {
      const li = node('li');
      li.appendChild(node('code', '', id));
      li.appendChild(document.createTextNode(' — not in this atlas '));
      const b = node('button', 'lists-remove-text', 'remove');
      b.type = 'button';
      b.setAttribute('aria-label', `Remove ${id} from the list`);
      b.addEventListener('click', () => remove(id, 0));
      li.appendChild(b);
      ul.appendChild(li);
    });
    el.missing.hidden = missing.length === 0;

    // the cards, from the index first; their data.json fills them in
    el.cards.textContent = '';
    const cards = units.map((u, i) => {
      const li = node('li', 'lists-card');
      li.style.setProperty('--unit-colour', u.colour);
      const head = node('div', 'lists-card-head');
      head.appendChild(key(u));
      const a = node('a', 'lists-id');
      a.href = u.page;
      a.appendChild(idCode(u.id));
      head.appendChild(a);
      const x = node('button', 'lists-remove', '×');
      x.type = 'button';
      x.title = 'Remove from the list';
      x.setAttribute('aria-label', `Remove ${u.id} from the list`);
      x.addEventListener('click', () => remove(u.id, i));
      head.appendChild(x);
      li.appendChild(head);
      const frame = node('div', 'lists-thumb');
      li.appendChild(frame);
      const label = node('p', 'lists-label');
      label.appendChild(node('span', 'lists-label-text', u.label));
      li.appendChild(label);
      u.flags.filter(f => f !== u.label).forEach(f => label.appendChild(node('span', 'flag flag-' + f, f)));
      li.appendChild(node('p', 'lists-where muted', `${u.title} · ${u.layer}`));
      const dl = node('dl', 'lists-stats');
      li.appendChild(dl);
      const note = node('p', 'lists-note muted', offline ? '' : 'loading…');
      li.appendChild(note);
      el.cards.appendChild(li);
      return {li, frame, dl, note};
    });
    if (focusAfter !== null) {  // a card was removed: focus the one now in its place (else the last, else the status)
      const buttons = el.cards.querySelectorAll('.lists-remove');
      const target = buttons[Math.min(focusAfter, buttons.length - 1)] || el.status;
      if (target === el.status) el.status.tabIndex = -1;
      target.focus();
      focusAfter = null;
    }
    el.hist.hidden = true;
    el.sample.hidden = true;
    if (offline || !units.length) return;

    Promise.all(units.map(load)).then(results => {
      if (gen !== generation) return;  // the list changed meanwhile
      units.forEach((u, i) => { u.data = results[i].data || null; u.error = results[i].error || null; });
      units.forEach((u, i) => fillCard(u, cards[i]));
      drawHistograms(units);
      drawSamples();
    });
  }

  function fillCard(u, card) {
    card.note.textContent = '';
    if (!u.data) {
      card.note.textContent = `Its data.json did not load (${u.error}).`;
      return;
    }
    const d = u.data, base = u.json;
    const fv = d.featurevis && d.featurevis.positive && d.featurevis.positive.image;
    const top = d.top && d.top.example && d.top.example.length ? d.top.example[0] : null;  // columns
    let src = null, alt = '';
    if (fv) {
      src = new URL(fv, base).href;
      alt = `Image optimized to excite ${u.id}`;
    } else if (top !== null && d.example_images) {
      src = new URL(d.example_images.replace('{example}', top), base).href;
      alt = `Its top dataset example, example ${top}`;
    }
    if (src) {
      const img = node('img');
      img.src = src;
      img.alt = alt;
      img.width = img.height = 128;
      img.decoding = 'async';
      card.frame.appendChild(img);
    } else if (d.fires_on && d.fires_on.token && d.fires_on.token.length) {  // a text unit: its tokens instead
      const tokens = node('p', 'lists-tokens', 'fires on ');
      d.fires_on.token.slice(0, 5).forEach((t, i) => {
        if (i) tokens.append(', ');
        tokens.append(node('code', '', t), ` ×${d.fires_on.count[i]}`);
      });
      card.frame.appendChild(tokens);
    } else {
      card.frame.appendChild(node('span', 'muted', 'no picture'));
    }
    const stats = d.stats || {};
    [['max', stats.max], ['mean', stats.mean]].forEach(([name, v]) => {
      card.dl.appendChild(node('dt', '', name));
      card.dl.appendChild(node('dd', 'num', fmt(v)));
    });
    if (!d.sample) card.note.textContent = 'no sample';
  }

  // ------------------------------------------------------------------ the histograms, overlaid

  let W = 760;  // the charts' width in pixels (their viewBox): the page's, when they are drawn
  const width = () => Math.round(Math.max(480, Math.min(1100, app.clientWidth || 760)));

  function axes(g, x0, x1, y0, y1, xt, yt, sx, sy, xfmt) {
    g.appendChild(svg('line', {x1: x0, x2: x1, y1: y1, y2: y1, class: 'lists-axis-line'}));
    g.appendChild(svg('line', {x1: x0, x2: x0, y1: y0, y2: y1, class: 'lists-axis-line'}));
    xt.forEach(v => {
      const x = sx(v);
      g.appendChild(svg('line', {x1: x, x2: x, y1: y1, y2: y1 + 4, class: 'lists-axis-line'}));
      g.appendChild(svg('text', {x, y: y1 + 16, 'text-anchor': 'middle', class: 'axis'}, xfmt(v)));
    });
    yt.forEach(v => {
      const y = sy(v);
      g.appendChild(svg('line', {x1: x0, x2: x1, y1: y, y2: y, class: 'lists-grid'}));
      g.appendChild(svg('text', {x: x0 - 6, y: y + 4, 'text-anchor': 'end', class: 'axis'}, fmt(v)));
    });
  }

  function drawHistograms(units) {
    el.histFigure.textContent = '';
    W = width();
    const hs = units.filter(u => u.data && u.data.histogram && u.data.histogram.counts && u.data.histogram.counts.length);
    if (!hs.length) return;
    el.hist.hidden = false;
    const H = 250, L = 56, R = 14, T = 12, B = 40, plotW = W - L - R, plotH = H - T - B;
    let lo = Math.min(...hs.map(u => u.data.histogram.lo)), hi = Math.max(...hs.map(u => u.data.histogram.hi));
    if (!(hi > lo)) { lo -= .5; hi += .5; }
    const sx = v => L + plotW * (v - lo) / (hi - lo);
    const spread = u => u.data.histogram.hi > u.data.histogram.lo;
    const peak = el.peak.checked;
    const density = u => {
      const h = u.data.histogram, total = h.counts.reduce((a, b) => a + b, 0), bw = (h.hi - h.lo) / h.counts.length;
      const d = h.counts.map(c => total ? c / total / bw : 0), top = Math.max(...d);
      return peak ? d.map(v => top ? v / top : 0) : d;
    };
    // the y axis fits the units with a spread; a unit whose values are all one number is a spike to the top
    const peaks = hs.filter(spread).map(u => Math.max(...density(u)));
    const ymax = peak ? 1.05 : peaks.length ? Math.max(...peaks) * 1.05 : 1;
    const sy = v => T + plotH * (1 - Math.min(v, ymax) / ymax);
    const s = svg('svg', {class: 'chart lists-chart lists-hist', viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img',
                          'aria-label': `Activation histograms of ${hs.length} unit${hs.length === 1 ? '' : 's'} overlaid, ` +
                                        `as densities from ${fmt(lo)} to ${fmt(hi)}`});
    const g = svg('g');
    s.appendChild(g);
    axes(g, L, L + plotW, T, T + plotH, ticks(lo, hi, 8), ticks(0, ymax, 4).filter(v => v <= ymax), sx, sy, fmt);
    g.appendChild(svg('text', {x: L + plotW / 2, y: H - 4, 'text-anchor': 'middle', class: 'axis'}, 'activation'));
    g.appendChild(svg('text', {x: 12, y: T + plotH / 2, 'text-anchor': 'middle', class: 'axis',
                               transform: `rotate(-90 12 ${T + plotH / 2})`}, peak ? 'density (share of its peak)' : 'density'));
    if (lo < 0 && hi > 0) g.appendChild(svg('line', {x1: sx(0), x2: sx(0), y1: T, y2: T + plotH, class: 'zero'}));
    const base = T + plotH;
    hs.forEach(u => {
      const h = u.data.histogram;
      let d;
      if (spread(u)) {
        const dens = density(u), bw = (h.hi - h.lo) / dens.length;
        d = `M${sx(h.lo).toFixed(1)} ${base}`;
        dens.forEach((v, i) => {
          const y = sy(v).toFixed(1);
          d += `V${y}H${sx(h.lo + (i + 1) * bw).toFixed(1)}`;
        });
        d += `V${base}`;
      } else {
        const x = sx(h.lo);
        d = `M${(x - 1.5).toFixed(1)} ${base}V${T}H${(x + 1.5).toFixed(1)}V${base}`;
      }
      const total = h.counts.reduce((a, b) => a + b, 0);
      const p = svg('path', {d, class: 'lists-hist-path', stroke: u.colour, fill: u.colour, 'data-unit': u.id});
      p.appendChild(svg('title', {}, `${u.id}: ${total} sampled activations from ${fmt(h.lo)} to ${fmt(h.hi)}`));
      g.appendChild(p);
    });
    el.histFigure.appendChild(s);
    const note = u => !u.data || !u.data.histogram ? 'no histogram'
      : !spread(u) ? `every value ${fmt(u.data.histogram.lo)}` : `${fmt(u.data.histogram.lo)} to ${fmt(u.data.histogram.hi)}`;
    const cap = node('figcaption');
    cap.appendChild(legend(units, note));
    el.histFigure.appendChild(cap);
  }

  // ------------------------------------------------------------------ the activations on the sample, per model

  function drawSamples() {
    el.plots.textContent = '';
    const units = shown.filter(u => u.data);
    if (!units.length) return;
    el.sample.hidden = false;
    W = width();
    const models = [];
    units.forEach(u => {
      let m = models.find(g => g.model === u.model);
      if (!m) models.push(m = {model: u.model, title: u.title, units: []});
      m.units.push(u);
    });
    models.forEach(m => el.plots.appendChild(samplePlot(m)));
  }

  function samplePlot(m) {
    const section = node('section', 'lists-sample-model');
    section.appendChild(node('h3', '', m.title));
    const withSample = m.units.filter(u => u.data.sample && Array.isArray(u.data.sample.examples) && u.data.sample.examples.length);
    const without = m.units.filter(u => withSample.indexOf(u) < 0);
    if (without.length) {
      const p = node('p', 'muted lists-no-sample', 'no sample: ');
      without.forEach((u, i) => { if (i) p.appendChild(document.createTextNode(', ')); p.appendChild(node('code', '', u.id)); });
      p.appendChild(document.createTextNode(withSample.length ? '' : ' (this atlas was built without the sample activations)'));
      section.appendChild(p);
    }
    if (!withSample.length) return section;

    // the inputs: the first unit's sample, in its order (then any other example a unit has)
    const examples = [], at = new Map();
    withSample.forEach(u => u.data.sample.examples.forEach(e => { if (!at.has(e)) { at.set(e, examples.length); examples.push(e); } }));
    const rescale = el.rescale.checked;
    const series = withSample.map(u => {
      const values = new Array(examples.length).fill(null);
      u.data.sample.examples.forEach((e, i) => {
        const v = u.data.sample.values[i];
        if (typeof v === 'number' && isFinite(v)) values[at.get(e)] = v;
      });
      const finite = values.filter(v => v !== null);
      const vlo = Math.min(...finite), vhi = Math.max(...finite);
      const ys = rescale ? values.map(v => v === null ? null : vhi > vlo ? (v - vlo) / (vhi - vlo) : .5) : values;
      return {unit: u, values, ys};
    });
    const all = series.flatMap(s => s.ys.filter(v => v !== null));
    let lo = all.length ? Math.min(...all) : 0, hi = all.length ? Math.max(...all) : 1;
    if (rescale) { lo = 0; hi = 1; }
    if (!(hi > lo)) { lo -= .5; hi += .5; }
    const pad = (hi - lo) * .06;
    lo -= pad; hi += pad;
    const yt = ticks(lo, hi, 5);
    const H = 280, L = 56, R = 14, T = 12, B = 44, plotW = W - L - R, plotH = H - T - B, n = examples.length;
    const sx = i => L + (n > 1 ? plotW * (i + .5) / n : plotW / 2);
    const sy = v => T + plotH * (1 - (v - lo) / (hi - lo));
    const s = svg('svg', {class: 'chart lists-chart lists-plot', viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img',
                          tabindex: 0, 'aria-label': `Activations of ${series.length} unit${series.length === 1 ? '' : 's'} of ` +
                          `${m.title} on ${n} sample inputs${rescale ? ', each rescaled to its range' : ''}; ` +
                          'use the arrow keys to read the values'});
    const g = svg('g');
    s.appendChild(g);
    const step = Math.max(1, Math.ceil(n / 16));
    const xt = [];
    for (let i = 0; i < n; i += step) xt.push(i);
    axes(g, L, L + plotW, T, T + plotH, xt, yt.filter(v => v >= lo && v <= hi), i => sx(i), sy, i => String(i + 1));
    g.appendChild(svg('text', {x: L + plotW / 2, y: H - 6, 'text-anchor': 'middle', class: 'axis'},
                      'sample input (in the sample\'s order)'));
    g.appendChild(svg('text', {x: 12, y: T + plotH / 2, 'text-anchor': 'middle', class: 'axis',
                               transform: `rotate(-90 12 ${T + plotH / 2})`}, rescale ? 'activation (rescaled)' : 'activation'));
    if (!rescale && lo < 0 && hi > 0) g.appendChild(svg('line', {x1: L, x2: L + plotW, y1: sy(0), y2: sy(0), class: 'zero'}));
    const guide = svg('line', {x1: 0, x2: 0, y1: T, y2: T + plotH, class: 'lists-guide', visibility: 'hidden'});
    g.appendChild(guide);
    const r = n > 40 ? 3 : 4;
    const points = [];  // [series][input] -> element or null
    series.forEach((sr, si) => {
      const u = sr.unit, sg = svg('g', {class: 'series', 'data-unit': u.id});
      let d = '', pen = false;
      sr.ys.forEach((v, i) => {
        if (v === null) { pen = false; return; }
        d += `${pen ? 'L' : 'M'}${sx(i).toFixed(1)} ${sy(v).toFixed(1)}`;
        pen = true;
      });
      sg.appendChild(svg('path', {d, class: 'lists-line', stroke: u.colour}));
      points.push(sr.ys.map((v, i) => {
        if (v === null) return null;
        const p = marker(u.shape, +sx(i).toFixed(1), +sy(v).toFixed(1), r,
                         {fill: u.colour, class: 'lists-point', 'data-series': si, 'data-input': i});
        p.appendChild(svg('title', {}, `example ${examples[i]} · ${u.id}: ${fmt(sr.values[i])}`));
        sg.appendChild(p);
        return p;
      }));
      g.appendChild(sg);
    });
    const ring = svg('circle', {r: r + 3.5, class: 'lists-cursor', visibility: 'hidden'});
    g.appendChild(ring);
    const fig = node('figure', 'lists-figure');
    fig.appendChild(s);

    // the readout: the input under the cursor (its picture, its id) and every unit's value on it
    const readout = node('div', 'lists-readout');
    readout.setAttribute('aria-live', 'polite');
    const pattern = withSample.map(u => u.data.example_images && {p: u.data.example_images, base: u.json}).find(Boolean);
    const pic = node('img');  // (in the readout from the first input shown: no <img> without a src)
    pic.width = pic.height = 48;
    const text = node('div', 'lists-readout-text', 'Point at a dot (or focus the plot and use the arrow keys) to read the input and the values.');
    readout.appendChild(text);
    let cur = null;  // [series, input]
    function show(si, i) {
      cur = [si, i];
      guide.setAttribute('x1', sx(i)); guide.setAttribute('x2', sx(i));
      guide.setAttribute('visibility', 'visible');
      const p = points[si][i];
      if (p) {
        ring.setAttribute('cx', sx(i)); ring.setAttribute('cy', sy(series[si].ys[i]));
        ring.setAttribute('stroke', series[si].unit.colour);
        ring.setAttribute('visibility', 'visible');
      } else {
        ring.setAttribute('visibility', 'hidden');
      }
      if (pattern) {
        pic.src = new URL(pattern.p.replace('{example}', examples[i]), pattern.base).href;
        pic.alt = `Example ${examples[i]}`;
        if (!pic.parentNode) readout.insertBefore(pic, text);
      }
      text.textContent = '';
      text.appendChild(node('b', '', `Input ${i + 1} of ${n}: example ${examples[i]}`));
      const ul = node('ul');
      series.forEach((sr, k) => {
        const li = node('li', k === si ? 'current' : '');
        li.appendChild(key(sr.unit));
        li.appendChild(node('code', '', sr.unit.id));
        li.appendChild(document.createTextNode(' ' + fmt(sr.values[i])));
        ul.appendChild(li);
      });
      text.appendChild(ul);
    }
    s.addEventListener('mouseover', ev => {
      const p = ev.target.closest && ev.target.closest('.lists-point');
      if (p) show(+p.getAttribute('data-series'), +p.getAttribute('data-input'));
    });
    s.addEventListener('focus', () => { if (!cur) show(0, Math.max(0, points[0].findIndex(Boolean))); });
    s.addEventListener('keydown', ev => {
      if (!cur) cur = [0, 0];
      let [si, i] = cur;
      if (ev.key === 'ArrowRight') i = Math.min(n - 1, i + 1);
      else if (ev.key === 'ArrowLeft') i = Math.max(0, i - 1);
      else if (ev.key === 'ArrowDown') si = Math.min(series.length - 1, si + 1);
      else if (ev.key === 'ArrowUp') si = Math.max(0, si - 1);
      else if (ev.key === 'Home') i = 0;
      else if (ev.key === 'End') i = n - 1;
      else return;
      ev.preventDefault();
      show(si, i);
    });
    const cap = node('figcaption');
    cap.appendChild(legend(series.map(sr => sr.unit), u => {
      const sr = series.find(x => x.unit === u), f = sr.values.filter(v => v !== null);
      return f.length ? `${fmt(Math.min(...f))} to ${fmt(Math.max(...f))}` : 'no values';
    }));
    fig.appendChild(cap);
    section.appendChild(fig);
    section.appendChild(readout);
    return section;
  }

  // ------------------------------------------------------------------ controls

  el.copy.addEventListener('click', () => {
    const text = el.link.value;
    const selected = () => {
      el.link.focus();
      el.link.select();
      let ok = false;
      try { ok = document.execCommand('copy'); } catch (e) { ok = false; }
      el.copyStatus.textContent = ok ? 'Copied.' : 'Selected: press Ctrl+C (⌘C) to copy.';
    };
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(text).then(() => { el.copyStatus.textContent = 'Copied.'; }, selected);
    } else {
      selected();
    }
  });
  el.link.addEventListener('focus', () => el.link.select());
  el.save.addEventListener('click', () => {
    if (saveStored(current)) {
      el.save.hidden = true;
      el.copyStatus.textContent = `Saved: this is your list now (${current.length} unit${current.length === 1 ? '' : 's'}).`;
    } else {
      el.copyStatus.textContent = 'This browser does not let the page keep a list.';
    }
  });
  el.rescale.addEventListener('change', drawSamples);
  el.peak.addEventListener('change', () => drawHistograms(shown));
  let resized = null;
  window.addEventListener('resize', () => {  // redrawn (from what is loaded) when the page's width changed a lot
    clearTimeout(resized);
    resized = setTimeout(() => {
      if (Math.abs(width() - W) < 60 || !shown.some(u => u.data)) return;
      drawHistograms(shown);
      drawSamples();
    }, 200);
  });
  window.addEventListener('hashchange', render);
  window.addEventListener('storage', ev => {  // the list changed in another tab
    if (ev.key !== AtlasList.key) return;
    if (source === 'stored') { render(); return; }
    const st = loadStored();
    el.save.hidden = !(st !== null && !same(st, current));
  });
  render();
})();
