// "apache-arrow" for duckdb-browser.mjs (the SQL page's import map points here): the names it imports,
// from window.Arrow, which apache-arrow's UMD build (Arrow.esnext.min.js, loaded first by sql.js) sets.
// Those of DuckDB-WASM 1.32.0: a newer one that imports more fails to load with a SyntaxError naming it.
const Arrow = globalThis.Arrow;
export const { RecordBatchReader, Table, Type, tableToIPC } = Arrow;
