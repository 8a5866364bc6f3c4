// Neuron Atlas: the embeddable unit card (<unit>/embed.html). The card's page holds its title, label, feature
// vis and link; this script draws the rest from the unit's data.json beside it (one renderer for every card, so
// each card is a few hundred bytes): the histogram and the top dataset examples. Where the JSON cannot be read
// (file://, a blocked request) the card stays as it is, with its link to the unit page.
(function () {
  'use strict';
  const card = document.querySelector('article.card[data-json]');
  if (!card) return;
  const SVG = 'http://www.w3.org/2000/svg';
  const fmt = v => {
    if (v === null || v === undefined) return '—';
    const s = Number(v).toPrecision(3);
    return s.includes('.') && !s.includes('e') ? s.replace(/\.?0+$/, '') : s;
  };

  function svg(tag, attrs, parent) {
    const el = document.createElementNS(SVG, tag);
    Object.entries(attrs).forEach(([k, v]) => el.setAttribute(k, v));
    if (parent) parent.appendChild(el);
    return el;
  }

  function histogram(h, where) {
    const counts = (h && h.counts) || [], top = Math.max(0, ...counts), total = counts.reduce((a, b) => a + b, 0);
    if (!total) return;
    const width = 360, height = 120, plot = height - 18, bw = width / counts.length;
    const chart = svg('svg', {class: 'chart', viewBox: `0 0 ${width} ${height}`, width, height, role: 'img',
                             'aria-label': `Histogram of activations from ${fmt(h.lo)} to ${fmt(h.hi)}`});
    const d = counts.map((c, i) => c ? `M${(i * bw).toFixed(1)} ${plot}v${(-plot * c / top).toFixed(1)}` +
                                       `h${Math.max(bw - 1, 0.5).toFixed(1)}V${plot}Z` : '').join('');
    svg('title', {}, svg('path', {d, class: 'bar'}, chart)).textContent =
      `${total} sampled activations in ${counts.length} bins, at most ${top} in one`;
    svg('text', {x: 0, y: height - 3, class: 'axis'}, chart).textContent = fmt(h.lo);
    svg('text', {x: width, y: height - 3, class: 'axis', 'text-anchor': 'end'}, chart).textContent = fmt(h.hi);
    if (h.lo < 0 && 0 < h.hi) {
      const x = (width * -h.lo / (h.hi - h.lo)).toFixed(2);
      svg('line', {x1: x, x2: x, y1: 0, y2: plot, class: 'zero'}, chart);
    }
    where.prepend(chart);
    where.hidden = false;
  }

  function examples(d, list) {
    const top = d.top || {}, ids = d.example_images ? (top.example || []).slice(0, 6) : [];  // text: no images
    ids.forEach((example, i) => {
      const li = document.createElement('li'), img = document.createElement('img'), value = document.createElement('span');
      img.src = d.example_images.replace('{example}', example);
      img.alt = `Example ${example}, label ${top.label[i]}`;
      value.textContent = fmt(top.value[i]);
      li.append(img, value);
      list.appendChild(li);
    });
    list.hidden = !ids.length;
  }

  fetch(card.dataset.json).then(r => { if (!r.ok) throw new Error(r.status); return r.json(); }).then(d => {
    histogram(d.histogram, card.querySelector('figure.histogram'));
    examples(d, card.querySelector('ol.top'));
  }).catch(() => {});
})();
