// Neuron Atlas: hover previews on map points (data-thumb). The pages work without it.
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
