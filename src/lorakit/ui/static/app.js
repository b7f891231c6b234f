// lorakit ui: the queue's refresh and the run form's live check. No framework; the pages work without it too.
"use strict";
const lorakit = {
  csrf: document.querySelector('meta[name="csrf"]').content,

  post(url, data) {
    const body = new URLSearchParams(data);
    body.set("csrf", lorakit.csrf);
    return fetch(url, {method: "POST", body, headers: {"Accept": "application/json"}});
  },

  // Reload the queue when a run changes status or appears; otherwise refresh the progress cells.
  refreshQueue() {
    const shown = () => Array.from(document.querySelectorAll("#queue tbody tr[data-id]"))
      .map(row => row.dataset.id + ":" + row.querySelector(".status").textContent).join(",");
    setInterval(async () => {
      const response = await fetch("/api/runs");
      if (!response.ok) return;
      const runs = await response.json();
      if (runs.map(run => run.id + ":" + run.status).join(",") !== shown()) { location.reload(); return; }
      for (const run of runs) {
        const cell = document.querySelector(`#queue tr[data-id="${run.id}"] .progress`);
        if (cell && run.total) cell.textContent = `${run.step} / ${run.total}`;
      }
    }, 1000);
  },

  // Check the form with the server's parser as it is edited; show the command and TOML it makes.
  watchForm(form) {
    let timer = null;
    const check = async () => {
      const data = new FormData(form);
      data.delete("action");
      const response = await lorakit.post("/api/form", data);
      if (!response.ok) return;
      const result = await response.json();
      const error = document.getElementById("form-error");
      error.hidden = !result.error;
      error.textContent = result.error || "";
      document.getElementById("form-warnings").replaceChildren(
        ...result.warnings.map(text => Object.assign(document.createElement("li"), {textContent: text})));
      if (!result.error) {
        document.getElementById("export-command").textContent = result.command;
        document.getElementById("export-toml").textContent = result.toml;
      }
    };
    form.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(check, 400); });
    check();
  },
};
