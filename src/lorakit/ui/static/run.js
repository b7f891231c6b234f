// The live view of one run: server-sent events from /runs/<id>/stream feed the progress line, the curves
// (uPlot), the sample gallery, the saved files and the log's tail.
"use strict";
lorakit.watchRun = function (runId) {
  const $ = id => document.getElementById(id);
  const series = {};          // key -> [[steps], [values]]
  const charts = {};
  const savedPaths = new Set();
  lorakit.updates = 0;        // messages received (the page-speed benchmark reads it)

  const CHARTS = {
    "chart-loss": key => key === "loss/current" || key === "loss/average" || key === "loss/epoch",
    "chart-lr": key => key.startsWith("lr/"),
    "chart-validation": key => key.startsWith("loss/validation"),
  };
  const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
  const number = value => value === 0 ? "0" : Math.abs(value) < 0.01 ? value.toExponential(1) : value.toPrecision(3);

  function chartData(keys) {
    // One x axis (the union of steps); values missing at a step are null.
    const steps = Array.from(new Set(keys.flatMap(key => series[key][0]))).sort((a, b) => a - b);
    const index = new Map(steps.map((step, i) => [step, i]));
    return [steps, ...keys.map(key => {
      const column = new Array(steps.length).fill(null);
      series[key][0].forEach((step, i) => { column[index.get(step)] = series[key][1][i]; });
      return column;
    })];
  }

  function redraw() {
    for (const [id, wanted] of Object.entries(CHARTS)) {
      const keys = Object.keys(series).filter(wanted).sort();
      if (!keys.length) continue;
      const element = $(id);
      const name = keys.join("|");
      if (!charts[id] || charts[id].name !== name) {
        if (charts[id]) charts[id].plot.destroy();
        const options = {
          width: element.clientWidth || 480, height: 220, legend: {live: false},
          scales: {x: {time: false}},
          axes: [{label: "step"}, {size: 70, values: (plot, ticks) => ticks.map(number)}],
          series: [{label: "step"}, ...keys.map((key, i) => ({label: key, stroke: COLOURS[i % COLOURS.length],
                                                               spanGaps: true, points: {show: false}}))],
        };
        charts[id] = {name, plot: new uPlot(options, chartData(keys), element)};
      } else {
        charts[id].plot.setData(chartData(keys));
      }
    }
  }

  function addEvent(event) {
    if (event.event === "log") {
      for (const [key, value] of Object.entries(event.values)) {
        if (!series[key]) series[key] = [[], []];
        series[key][0].push(event.step);
        series[key][1].push(value);
      }
    } else if (event.event === "samples") {
      $("no-samples")?.remove();
      const point = document.createElement("div");
      point.className = "sample-point";
      point.innerHTML = `<h3>step ${event.step}</h3>`;
      for (const image of event.images) {
        const figure = document.createElement("figure");
        const link = Object.assign(document.createElement("a"), {href: image.url, target: "_blank"});
        link.appendChild(Object.assign(document.createElement("img"), {src: image.thumb, alt: image.prompt}));
        figure.appendChild(link);
        figure.appendChild(Object.assign(document.createElement("figcaption"), {textContent: image.prompt}));
        point.appendChild(figure);
      }
      $("gallery").prepend(point);
    } else if (event.event === "saved" && !savedPaths.has(event.path)) {
      savedPaths.add(event.path);
      const item = document.createElement("li");
      const name = event.path.split("/").pop();
      const download = Object.assign(document.createElement("a"),
        {href: "/files?" + new URLSearchParams({path: event.path, download: "1"}), textContent: name});
      const inspect = Object.assign(document.createElement("button"), {textContent: "inspect", type: "button"});
      inspect.onclick = async () => {
        const response = await fetch("/api/inspect?" + new URLSearchParams({path: event.path}));
        $("inspect").hidden = false;
        $("inspect").textContent = await response.text();
      };
      item.append(download, ` (${event.kind}, step ${event.step}${event.state ? ", with its state" : ""}) `, inspect);
      $("saves").appendChild(item);
    }
  }

  function showStatus(run) {
    $("status").textContent = run.status;
    $("status").className = "badge status-" + run.status;
    $("message").textContent = run.message || "";
    $("stop-form").hidden = !["queued", "running"].includes(run.status);
    $("stop").textContent = run.status === "queued" ? "Cancel" : "Stop";
    $("resume-form").hidden = !(["stopped", "interrupted"].includes(run.status) && run.state);
  }

  function showProgress(run) {
    if (!run.total) return;
    $("progress").max = run.total;
    $("progress").value = run.step;
    $("steps").textContent = `step ${run.step} / ${run.total}`;
    $("rate").textContent = run.rate ? `${run.rate.toFixed(2)} it/s` : "";
    $("eta").textContent = run.eta && run.status === "running" ? `ETA ${Math.round(run.eta)} s` : "";
  }

  // Progress from the events themselves, between status messages.
  const progress = {step: 0, total: null, times: []};
  function track(event) {
    if (event.event === "start") {
      progress.total = event.max_train_steps; progress.step = event.first_step; progress.times = [];
    }
    if (event.event === "log" && "loss/current" in event.values) {
      progress.step = event.step;
      progress.times.push([event.step, event.time]);
      if (progress.times.length > 21) progress.times.shift();
    }
  }
  function progressNow(status) {
    const times = progress.times;
    let rate = null;
    if (times.length > 1 && times[times.length - 1][1] > times[0][1])
      rate = (times[times.length - 1][0] - times[0][0]) / (times[times.length - 1][1] - times[0][1]);
    return {status, step: progress.step, total: progress.total, rate,
            eta: rate && progress.total ? (progress.total - progress.step) / rate : null};
  }

  let status = $("status").textContent;
  const source = new EventSource(`/runs/${runId}/stream`);
  source.onmessage = message => {
    const data = JSON.parse(message.data);
    lorakit.updates += 1;
    if (data.status) { status = data.status.status; showStatus(data.status); }
    if (data.events) {
      data.events.forEach(event => { addEvent(event); track(event); });
      redraw();
    }
    showProgress(progressNow(status));
    if (data.log) $("log").textContent = data.log.join("\n");
  };
  // Stop and Resume without leaving the page; a second click changes nothing (the server ignores it too).
  for (const id of ["stop-form", "resume-form"]) {
    $(id).addEventListener("submit", async submit => {
      submit.preventDefault();
      const button = $(id).querySelector("button");
      button.disabled = true;
      const response = await lorakit.post($(id).action, {});
      if (id === "resume-form" && response.ok) location.href = (await response.json()).url;
      button.disabled = false;
    });
  }
};
