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
