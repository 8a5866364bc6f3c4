// Neuron Atlas SQL page: DuckDB-WASM in a Web Worker, over the site's Parquet files (data/<table>.parquet).
// The page's #sql-config JSON gives the engine's files ({name: URL}, see atlas_builder/sql_engine.py) and the
// tables ([{name, href}]), every URL relative to the page, so the site works from any subpath. The engine
// starts loading when the page opens: apache-arrow's UMD build (window.Arrow), then duckdb-browser.mjs,
// whose `import "apache-arrow"` the page's import map sends to arrow.mjs (window.Arrow's names), then the
// worker and its wasm, and parquet-wasm. DuckDB-WASM reads Parquet only with an extension it would download
// from elsewhere, so extension loading is off and a table is made from its file the first time a query
// names it: fetched, turned into an Arrow IPC stream by parquet-wasm, inserted into DuckDB.
// Results are built with textContent only: values are never parsed as HTML.
const MAX_ROWS = 1000;
const config = JSON.parse(document.getElementById('sql-config').textContent);
const form = document.getElementById('sql-form');
const query = document.getElementById('sql-query');
const status = document.getElementById('sql-status');
const result = document.getElementById('sql-result');
const table = document.getElementById('sql-table');
const url = href => new URL(href, document.baseURI).href;

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const script = document.createElement('script');
    script.src = src;
    script.onload = resolve;
    script.onerror = () => reject(new Error('could not load ' + src));
    document.head.append(script);
  });
}

async function start() {
  const engine = config.engine;
  await loadScript(url(engine['Arrow.esnext.min.js']));
  const [duckdb, parquet] = await Promise.all([import(url(engine['duckdb-browser.mjs'])),
                                               import(url(engine['parquet_wasm.js']))]);
  const worker = new Worker(url(engine['duckdb-browser-eh.worker.js']));
  const db = new duckdb.AsyncDuckDB(new duckdb.VoidLogger(), worker);
  await Promise.all([db.instantiate(url(engine['duckdb-eh.wasm'])),
                     parquet.default({module_or_path: url(engine['parquet_wasm_bg.wasm'])})]);
  await db.open({query: {castDecimalToDouble: true}});
  const con = await db.connect();
  await con.query('SET autoinstall_known_extensions = false; SET autoload_known_extensions = false');
  return {con, parquet, version: duckdb.PACKAGE_VERSION, loaded: new Map()};
}

// Make sure each table the query names (a whole word, any case) is loaded; each is loaded once.
function loadTables(engine, sql) {
  const named = config.tables.filter(t => new RegExp('\\b' + t.name + '\\b', 'i').test(sql));
  return Promise.all(named.map(t => {
    if (!engine.loaded.has(t.name)) engine.loaded.set(t.name, (async () => {
      const response = await fetch(url(t.href));
      if (!response.ok) throw new Error(`${t.href}: HTTP ${response.status}`);
      const ipc = engine.parquet.readParquet(new Uint8Array(await response.arrayBuffer())).intoIPCStream();
      await engine.con.insertArrowFromIPCStream(ipc, {name: t.name, create: true});
    })().catch(error => { engine.loaded.delete(t.name); throw error; }));
    return engine.loaded.get(t.name);
  }));
}

// A cell's text, from its Arrow type: NULL, integers beyond 2^53 (BigInt) in full, numbers as JavaScript
// shows them, lists as [a, b], structs and maps as {key: value}, dates and timestamps as DuckDB shows them.
function text(value, type) {
  if (value === null || value === undefined) return 'NULL';
  const is = Arrow.DataType;
  if (is.isDate(type)) return new Date(value).toISOString().slice(0, 10);
  if (is.isTimestamp(type)) return new Date(value).toISOString().replace('T', ' ').replace(/(\.000)?Z$/, '');
  if (is.isList(type) || is.isFixedSizeList(type)) {
    return '[' + Array.from(value, v => text(v, type.children[0].type)).join(', ') + ']';
  }
  if (is.isStruct(type)) {
    return '{' + type.children.map(f => f.name + ': ' + text(value[f.name], f.type)).join(', ') + '}';
  }
  if (is.isMap(type)) {
    const [key, val] = type.children[0].type.children;
    return '{' + Array.from(value, ([k, v]) => text(k, key.type) + ': ' + text(v, val.type)).join(', ') + '}';
  }
  if (value instanceof Uint8Array) return '\\x' + Array.from(value, b => b.toString(16).padStart(2, '0')).join('\\x');
  return String(value);
}

function show(arrow) {
  const fields = arrow.schema.fields;
  const columns = fields.map((f, i) => arrow.getChildAt(i));
  const head = document.createElement('tr');
  for (const f of fields) {
    const th = document.createElement('th');
    th.scope = 'col';
    th.textContent = f.name;
    head.append(th);
  }
  const body = document.createDocumentFragment();
  const shown = Math.min(arrow.numRows, MAX_ROWS);
  for (let r = 0; r < shown; r++) {
    const tr = document.createElement('tr');
    columns.forEach((column, c) => {
      const td = document.createElement('td');
      td.textContent = text(column.get(r), fields[c].type);
      tr.append(td);
    });
    body.append(tr);
  }
  table.tHead.replaceChildren(head);
  table.tBodies[0].replaceChildren(body);
  result.hidden = false;
  return shown;
}

const plural = (n, word) => n.toLocaleString('en') + ' ' + word + (n === 1 ? '' : 's');
let running = 0;  // queries started: a newer one's result replaces an older one's
const ready = start();
status.textContent = 'Loading the query engine…';
ready.then(
  ({version}) => {
    if (!running) status.textContent = `Ready: DuckDB-WASM ${version}, ${plural(config.tables.length, 'table')}.`;
  },
  error => {
    status.textContent = location.protocol === 'file:'
      ? 'The query engine runs only when the site is served over HTTP (e.g. make serve), not opened from disk.'
      : 'The query engine could not load: ' + error.message;
  });

async function run() {
  const sql = query.value;
  const mine = ++running;
  status.textContent = 'Running…';
  try {
    const engine = await ready;
    const t0 = performance.now();
    await loadTables(engine, sql);
    const arrow = await engine.con.query(sql);
    const ms = performance.now() - t0;
    if (mine !== running) return;
    const shown = show(arrow);
    const part = shown < arrow.numRows ? ` (the first ${shown.toLocaleString('en')} shown)` : '';
    status.textContent = `${plural(arrow.numRows, 'row')}${part} in ${ms.toFixed(0)} ms.`;
  } catch (error) {
    if (mine !== running) return;
    result.hidden = true;
    status.textContent = 'Error: ' + (error && error.message ? error.message : String(error));
  }
}

form.addEventListener('submit', event => { event.preventDefault(); run(); });
query.addEventListener('keydown', event => {
  if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) { event.preventDefault(); run(); }
});
for (const button of document.querySelectorAll('.sql-examples button')) {
  button.addEventListener('click', () => { query.value = button.dataset.sql; run(); });
}
