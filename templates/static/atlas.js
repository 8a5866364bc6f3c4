// Neuron Atlas: hover previews on map points (data-thumb); the architecture view opens the module a link names. The pages work without it.
(function () {
  var tip = null;
  function show(ev) {
    var el = ev.target.closest('[data-thumb]');
    if (!el) return;
    if (!tip) {
      tip = document.createElement('div');
      tip.className = 'map-tip';
      tip.innerHTML = '<img alt=""><span></span>';
      document.body.appendChild(tip);
    }
    tip.querySelector('img').src = el.getAttribute('data-thumb');
    var title = el.querySelector('title');
    tip.querySelector('span').textContent = title ? title.textContent : '';
    tip.style.left = (ev.pageX + 14) + 'px';
    tip.style.top = (ev.pageY + 14) + 'px';
    tip.style.display = 'block';
  }
  function hide(ev) {
    if (tip && ev.target.closest('[data-thumb]')) tip.style.display = 'none';
  }
  document.addEventListener('mouseover', show);
  document.addEventListener('mouseout', hide);
})();
// The architecture view: a link to a collapsed module's graph (#arch-...) opens it and the modules around it.
(function () {
  function open() {
    var id = decodeURIComponent(location.hash.slice(1));
    var el = id && document.getElementById(id);
    for (; el; el = el.parentElement) if (el.tagName === 'DETAILS') el.open = true;
    if (id && document.getElementById(id)) document.getElementById(id).scrollIntoView();
  }
  window.addEventListener('hashchange', open);
  open();
})();
// The unit list kept in this browser (localStorage "atlas-list", a JSON array of unit ids) and its URL fragment
// (the ids URI-encoded but for their slashes, joined by commas), for the unit pages' "Add to list" below and for
// lists.js. load() is null where storage is refused (private modes, blocked cookies); save() says if it kept it.
window.AtlasList = (function () {
  var KEY = 'atlas-list';
  return {
    key: KEY,
    load: function () {
      try {
        var value = JSON.parse(localStorage.getItem(KEY) || '[]');
        return Array.isArray(value) ? value.filter(function (v) { return typeof v === 'string'; }) : [];
      } catch (e) {
        return null;
      }
    },
    save: function (ids) {
      try { localStorage.setItem(KEY, JSON.stringify(ids)); return true; } catch (e) { return false; }
    },
    fragment: function (ids) {
      return ids.map(function (id) { return encodeURIComponent(id).replace(/%2F/gi, '/'); }).join(',');
    }
  };
})();
// "Add to list" on unit pages (button.add-to-list, hidden without JavaScript): toggles the unit in that list, with a
// link "open list (N)" to lists.html#<the ids>. Where storage is refused the list lasts the page.
(function () {
  var buttons = document.querySelectorAll('button.add-to-list[data-unit]');
  if (!buttons.length) return;
  var memory = [];
  function load() {
    memory = AtlasList.load() || memory;
    return memory.slice();
  }
  function save(list) {
    memory = list.slice();
    AtlasList.save(list);
  }
  var fragment = AtlasList.fragment;
  function update() {
    var list = load();
    Array.prototype.forEach.call(buttons, function (button) {
      var inList = list.indexOf(button.getAttribute('data-unit')) >= 0;
      button.textContent = inList ? 'In your list \u2713 (remove)' : 'Add to list';
      button.setAttribute('aria-pressed', inList ? 'true' : 'false');
      var link = button.nextElementSibling;
      if (!link || !link.classList.contains('list-link')) {
        link = document.createElement('a');
        link.className = 'list-link';
        button.parentNode.insertBefore(link, button.nextSibling);
      }
      link.href = (button.getAttribute('data-lists') || 'lists.html') + '#' + fragment(list);
      link.textContent = 'open list (' + list.length + ')';
      link.hidden = list.length === 0;
    });
  }
  Array.prototype.forEach.call(buttons, function (button) {
    button.hidden = false;
    button.addEventListener('click', function () {
      var id = button.getAttribute('data-unit'), list = load(), at = list.indexOf(id);
      if (at >= 0) list.splice(at, 1); else list.push(id);
      save(list);
      update();
    });
  });
  window.addEventListener('storage', function (ev) { if (ev.key === AtlasList.key) update(); });
  update();
})();
// The unit page's log-scale histogram: the same bars at log(1 + count) heights, drawn from the linear
// histogram's data-counts when its <details> is first opened (shown only where this script runs).
(function () {
  var box = document.querySelector('details.log-histogram');
  var linear = box && box.parentNode.querySelector('svg[data-counts]');
  if (!linear) return;
  box.hidden = false;
  box.addEventListener('toggle', function () {
    if (!box.open || box.querySelector('svg')) return;
    var counts = linear.getAttribute('data-counts').split(',').map(Number);
    var svg = linear.cloneNode(true), bars = svg.querySelector('path.bar');
    var plotH = Number(svg.getAttribute('height')) - 18, barW = Number(svg.getAttribute('width')) / counts.length;
    var top = Math.log1p(Math.max.apply(null, counts)), d = '';
    counts.forEach(function (c, i) {
      if (c) d += 'M' + (i * barW).toFixed(1) + ' ' + plotH + 'v' + (-plotH * Math.log1p(c) / top).toFixed(1) +
        'h' + Math.max(barW - 1, 0.5).toFixed(1) + 'V' + plotH + 'Z';
    });
    bars.setAttribute('d', d);
    svg.removeAttribute('data-counts');
    svg.setAttribute('aria-label', svg.getAttribute('aria-label') + ', log scale');
    box.appendChild(svg);
  });
})();
