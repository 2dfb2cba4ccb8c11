// The dashboard index: sort, filter by density and search the features of data.js
// (window.SAE_DASHBOARD: rows [index, density, max, mean, summary, top tokens]), PAGE rows
// at a time. Plain DOM, no library: the page works offline.
"use strict";
(function () {
  const PAGE = 200;
  const data = window.SAE_DASHBOARD;
  const COLUMNS = ["index", "density", "max", "mean", "summary"];
  const body = document.querySelector("#features tbody");
  const search = document.getElementById("search");
  const dmin = document.getElementById("dmin");
  const dmax = document.getElementById("dmax");
  const count = document.getElementById("count");
  const more = document.getElementById("more");
  let key = 1;
  let descending = true;
  let limit = PAGE;

  function percent(input, fallback) {
    const value = parseFloat(input.value);
    return Number.isFinite(value) ? value / 100 : fallback;
  }

  function matching() {
    const words = search.value.trim().toLowerCase();
    const lo = percent(dmin, -Infinity);
    const hi = percent(dmax, Infinity);
    return data.features.filter(function (row) {
      if (row[1] < lo || row[1] > hi) return false;
      if (!words) return true;
      // The summary and every token the feature fires on most (row[5]), or its index.
      return row[4].toLowerCase().includes(words) || row[5].toLowerCase().includes(words) ||
        String(row[0]) === words;
    });
  }

  function cell(tr, text) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
  }

  function render() {
    const rows = matching();
    const sign = descending ? -1 : 1;
    rows.sort(function (a, b) {
      if (a[key] < b[key]) return -sign;
      if (a[key] > b[key]) return sign;
      return a[0] - b[0];
    });
    body.replaceChildren();
    for (const row of rows.slice(0, limit)) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      const link = document.createElement("a");
      link.href = "features/" + row[0] + ".html";
      link.textContent = row[0];
      td.appendChild(link);
      tr.appendChild(td);
      cell(tr, (100 * row[1]).toPrecision(3) + "%");
      cell(tr, row[2].toFixed(3));
      cell(tr, row[3].toFixed(3));
      cell(tr, row[4]);
      body.appendChild(tr);
    }
    count.textContent = rows.length + " of " + data.features.length + " features";
    more.hidden = rows.length <= limit;
    document.querySelectorAll("#features th").forEach(function (th, i) {
      th.setAttribute("aria-sort", i === key ? (descending ? "descending" : "ascending") : "none");
    });
  }

  document.querySelectorAll("#features th").forEach(function (th, i) {
    th.classList.add("sortable");
    th.addEventListener("click", function () {
      descending = i === key ? !descending : COLUMNS[i] !== "summary" && COLUMNS[i] !== "index";
      key = i;
      render();
    });
  });
  for (const input of [search, dmin, dmax]) {
    input.addEventListener("input", function () {
      limit = PAGE;
      render();
    });
  }
  more.addEventListener("click", function () {
    limit += PAGE;
    render();
  });
  render();
})();
