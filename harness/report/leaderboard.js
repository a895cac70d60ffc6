(function () {
  var table = document.getElementById("board"), tbody = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var rows = Array.prototype.slice.call(tbody.rows);
  var keys = ["experiment", "method", "model"];
  var state = {sort: null, desc: true, f: {experiment: "", method: "", model: ""}};
  function colOf(name) {
    for (var i = 0; i < heads.length; i++) if (heads[i].dataset.name === name) return i;
    var delta = function (s) { return s.indexOf("\u0394 ") === 0; };  // a "Δ ..." column only when asked for
    var hits = heads.filter(function (h) {
      return h.dataset.name.split("/").pop() === name && delta(h.dataset.name) === delta(name);
    });
    return hits.length === 1 ? heads.indexOf(hits[0]) : null;
  }
  function sortKey(row, c, numeric) {
    var td = row.cells[c];
    if (numeric) { var v = td.getAttribute("data-v"); return v === null || v === "" ? null : Number(v); }
    var s = td.getAttribute("data-s");
    s = s === null ? td.textContent : s;
    return s === "" ? null : s;
  }
  function apply(writeHash) {
    var list = rows.slice();
    if (state.sort !== null) {
      var c = state.sort, numeric = heads[c].dataset.type === "num";
      list.sort(function (a, b) {
        var x = sortKey(a, c, numeric), y = sortKey(b, c, numeric);
        if (x === null || y === null) {
          if (x === null && y === null) return a.dataset.i - b.dataset.i;
          return x === null ? 1 : -1;  // missing values last, in either order
        }
        var d = numeric ? x - y : x.localeCompare(y);
        if (state.desc) d = -d;
        return d || a.dataset.i - b.dataset.i;
      });
    }
    list.forEach(function (r) { tbody.appendChild(r); });
    var shown = 0;
    rows.forEach(function (r) {
      var ok = keys.every(function (k) { return !state.f[k] || r.dataset[k] === state.f[k]; });
      r.hidden = !ok;
      if (ok) shown++;
    });
    heads.forEach(function (h, i) {
      if (i === state.sort) h.setAttribute("aria-sort", state.desc ? "descending" : "ascending");
      else h.removeAttribute("aria-sort");
    });
    keys.forEach(function (k) { var s = document.getElementById("f-" + k); if (s) s.value = state.f[k]; });
    document.getElementById("count").textContent = shown + " of " + rows.length + " rows";
    if (writeHash) {
      var parts = [];
      if (state.sort !== null) parts.push("sort=" + encodeURIComponent(heads[state.sort].dataset.name),
                                          "order=" + (state.desc ? "desc" : "asc"));
      keys.forEach(function (k) { if (state.f[k]) parts.push(k + "=" + encodeURIComponent(state.f[k])); });
      history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname + location.search);
    }
  }
  function fromHash() {
    var p = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      if (!kv) return;
      var i = kv.indexOf("="), k = i < 0 ? kv : kv.slice(0, i);
      p[decodeURIComponent(k)] = i < 0 ? "" : decodeURIComponent(kv.slice(i + 1).replace(/\+/g, " "));
    });
    state.sort = p.sort ? colOf(p.sort) : null;
    state.desc = state.sort === null ? true :
      (p.order ? p.order !== "asc" : heads[state.sort].dataset.type === "num");
    keys.forEach(function (k) { state.f[k] = p[k] || ""; });
    apply(false);
  }
  rows.forEach(function (r, i) { r.dataset.i = i; });
  heads.forEach(function (h, i) {
    h.addEventListener("click", function () {
      if (state.sort === i) state.desc = !state.desc;
      else { state.sort = i; state.desc = h.dataset.type === "num"; }  // numbers: highest first
      apply(true);
    });
  });
  keys.forEach(function (k) {
    var s = document.getElementById("f-" + k);
    if (s) s.addEventListener("change", function () { state.f[k] = s.value; apply(true); });
  });
  window.addEventListener("hashchange", fromHash);
  fromHash();
})();
