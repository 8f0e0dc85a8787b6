// Playground page: streams /v1/completions (SSE over fetch) into the output panel.
// Everything generated or typed is inserted with textContent / text nodes, never as HTML,
// so a prompt such as <script>…</script> is shown, not run. The page's own strings come from the
// #i18n JSON block (中文 / English); generated text is never translated.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = { info: null, controllers: [], lang: "en", serverState: null, speeds: {} };
  const STRINGS = JSON.parse(document.getElementById("i18n").textContent);

  function t(key, vars) {
    const entry = STRINGS[key];
    let text = entry ? (entry[state.lang] ?? entry.en) : key;
    for (const [k, v] of Object.entries(vars || {})) text = text.replace(`{${k}}`, String(v));
    return text;
  }

  function chooseLanguage() {
    let saved = null;
    try {
      saved = localStorage.getItem("lang");
    } catch (_) { /* storage disabled: follow the browser */ }
    if (saved === "zh" || saved === "en") return saved;
    const preferred = navigator.languages && navigator.languages.length ? navigator.languages[0] : navigator.language;
    return (preferred || "en").toLowerCase().startsWith("zh") ? "zh" : "en";
  }

  function applyLanguage(lang) {
    state.lang = lang;
    document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
    document.documentElement.dataset.lang = lang;
    for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
    for (const node of document.querySelectorAll("[data-i18n-label]")) {
      node.setAttribute("aria-label", t(node.dataset.i18nLabel));
    }
    for (const node of document.querySelectorAll("[data-i18n-placeholder]")) {
      node.setAttribute("placeholder", t(node.dataset.i18nPlaceholder));
    }
    for (const button of document.querySelectorAll("[data-set-lang]")) {
      button.setAttribute("aria-pressed", String(button.dataset.setLang === lang));
    }
    if (state.serverState) setServerState(...state.serverState);
    if (state.info) renderModels(state.info);
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function formatCount(n) {
    if (n >= 1e9) return (n / 1e9).toFixed(2) + " B";
    if (n >= 1e6) return (n / 1e6).toFixed(1) + " M";
    if (n >= 1e3) return (n / 1e3).toFixed(1) + " k";
    return String(n);
  }

  function setStatus(text, kind) {
    const status = $("status");
    status.removeAttribute("data-i18n");
    status.textContent = text;
    status.dataset.state = kind;
  }

  // The pill is re-rendered on a language switch: kept as (key, vars, kind).
  function setServerState(key, vars, kind) {
    state.serverState = [key, vars, kind];
    const pill = $("server-state");
    pill.textContent = t(key, vars) + (state.info && state.info.backend ? ` · ${t("state_backend")}` : "");
    pill.dataset.state = kind;
  }

  // ------------------------------------------------------------------ models

  function renderModels(info) {
    const cards = $("model-cards");
    const select = $("model");
    const previous = select.value;
    cards.replaceChildren();
    select.replaceChildren();
    for (const m of info.models) {
      const card = el("div", "card model-card");
      card.dataset.model = m.id;
      card.append(el("div", "card-title", m.id));
      const dl = el("dl");
      const known = (v) => (v === null || v === undefined ? "–" : v);
      const rows = [
        ["card_params", m.n_params ? `${formatCount(m.n_params)} (${m.n_params.toLocaleString("en")})` : "–", ""],
        ["card_size", known(m.size), ""],
        ["card_precision", known(m.precision), "precision"],
        ["card_layers", `${known(m.n_layer)} · ${known(m.context_length)}`, ""],
        ["card_device", known(m.device), ""],
        ["card_measured", state.speeds[m.id] ?? "–", "speed"],
      ];
      for (const [key, v, cls] of rows) {
        const dt = el("dt", "", t(key));
        dt.dataset.i18n = key;
        dl.append(dt, el("dd", cls, v));
      }
      card.append(dl);
      cards.append(card);
      const option = el("option", "", m.id);
      option.value = m.id;
      select.append(option);
    }
    select.value = info.models.some((m) => m.id === previous) ? previous : info.default;
    $("compare-wrap").hidden = info.models.length < 2;
    $("model-wrap").hidden = info.models.length < 2;
  }

  async function loadInfo() {
    try {
      const res = await fetch("/api/info", { cache: "no-store" });
      const info = await res.json();
      if (!info.ready) {
        setServerState(info.error ? "state_failed" : "state_loading", {}, info.error ? "error" : "loading");
        if (info.error) $("server-state").title = info.error;
        setTimeout(loadInfo, info.error ? 5000 : 1000);
        return;
      }
      state.info = info;
      renderModels(info);
      setServerState("state_models", { n: info.models.length }, "ready");
    } catch (err) {
      setServerState("state_unreachable", {}, "error");
      setTimeout(loadInfo, 2000);
    }
  }

  // ------------------------------------------------------------------ streaming

  function readParams() {
    const num = (id) => {
      const raw = $(id).value.trim();
      return raw === "" ? null : Number(raw);
    };
    const params = {
      max_tokens: num("max_tokens") ?? 64,
      temperature: num("temperature") ?? 1,
      top_k: num("top_k") ?? 0,
      top_p: num("top_p") ?? 1,
    };
    const seed = num("seed");
    if (seed !== null) params.seed = seed;
    return params;
  }

  // Parse one SSE block ("data: …" lines) and hand the JSON to onChunk; true at [DONE].
  function handleBlock(block, onChunk) {
    const data = block
      .split("\n")
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).trimStart())
      .join("\n");
    if (!data) return false;
    if (data === "[DONE]") return true;
    const obj = JSON.parse(data);
    if (obj.error) throw new Error(obj.error.message);
    onChunk(obj);
    return false;
  }

  async function streamCompletion(body, onChunk, signal) {
    const res = await fetch("/v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
      signal,
    });
    if (!res.ok) {
      let message = res.statusText;
      try {
        message = (await res.json()).error.message;
      } catch (_) { /* not JSON: keep the status text */ }
      throw new Error(`${res.status}: ${message}`);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let sep;
      while ((sep = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, sep);
        buffer = buffer.slice(sep + 2);
        if (handleBlock(block, onChunk)) return;
      }
    }
  }

  // ------------------------------------------------------------------ output

  function resultCard(prompt) {
    const card = el("article", "card result");
    const pre = el("pre", "text");
    pre.append(el("span", "prompt", prompt));
    const gen = el("span", "gen");
    pre.append(gen);
    const foot = el("div", "result-foot", t("waiting"));
    card.append(pre, foot);
    return { card, gen, foot };
  }

  async function runModel(model, prompts, params, column, signal) {
    const cards = prompts.map((p) => {
      const c = resultCard(p);
      column.append(c.card);
      return c;
    });
    const t0 = performance.now();
    let tFirst = null;
    let usage = null;
    const reasons = {};
    await streamCompletion({ model, prompt: prompts, ...params }, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        const target = cards[choice.index];
        if (!target) continue;
        if (choice.text) {
          if (tFirst === null) tFirst = performance.now();
          target.gen.append(document.createTextNode(choice.text));
          target.foot.textContent = t("generating");
        }
        if (choice.finish_reason) {
          reasons[choice.index] = choice.finish_reason;
          target.foot.textContent = `${t("finish")}: ${choice.finish_reason}`;
        }
      }
    }, signal);
    const t1 = performance.now();
    const tokens = usage ? usage.completion_tokens : 0;
    const decodeSeconds = Math.max((t1 - (tFirst ?? t0)) / 1000, 1e-3);
    const rate = tokens / decodeSeconds;
    const summary = `${tokens} ${t("tokens")} · ${((t1 - t0) / 1000).toFixed(2)} s · ${rate.toFixed(1)} tok/s` +
      (tFirst !== null ? ` · ${t("first_token")} ${Math.round(tFirst - t0)} ms` : "");
    cards.forEach((c, i) => {
      c.foot.textContent = `${t("finish")}: ${reasons[i] ?? "?"}` + (prompts.length > 1 ? "" : ` · ${summary}`);
    });
    column.querySelector(".column-stats").textContent = summary;
    state.speeds[model] = `${rate.toFixed(1)} tok/s`;
    const speed = document.querySelector(`.model-card[data-model="${CSS.escape(model)}"] .speed`);
    if (speed) speed.textContent = state.speeds[model];
    return tokens;
  }

  async function generate(event) {
    event.preventDefault();
    if (!state.info) return;
    const text = $("prompt").value;
    const prompts = $("batch").checked
      ? text.split("\n").map((s) => s.trim()).filter((s) => s.length > 0)
      : [text];
    if (prompts.length === 0 || prompts.every((p) => p.trim() === "")) {
      setStatus(t("type_prompt_first"), "error");
      return;
    }
    const models = $("compare").checked && state.info.models.length > 1
      ? state.info.models.map((m) => m.id)
      : [$("model").value || state.info.default];
    const params = readParams();

    const output = $("output");
    output.replaceChildren();
    output.classList.toggle("compare", models.length > 1);
    const columns = models.map((model) => {
      const column = el("div", "column");
      const head = el("div", "column-head");
      head.append(el("span", "column-model", model), el("span", "column-stats", ""));
      column.append(head);
      output.append(column);
      return column;
    });

    state.controllers = models.map(() => new AbortController());
    $("generate").disabled = true;
    $("stop").disabled = false;
    setStatus(t("generating"), "running");
    const results = await Promise.allSettled(
      models.map((m, i) => runModel(m, prompts, params, columns[i], state.controllers[i].signal)));
    $("generate").disabled = false;
    $("stop").disabled = true;
    const failed = results.filter((r) => r.status === "rejected");
    if (failed.length) {
      const reason = failed[0].reason;
      const aborted = reason && reason.name === "AbortError";
      setStatus(aborted ? t("stopped") : `${t("error")}: ${reason.message}`, aborted ? "stopped" : "error");
      if (!aborted) output.prepend(el("p", "error", reason.message));
    } else {
      setStatus(t("done"), "done");
    }
  }

  function stop() {
    for (const c of state.controllers) c.abort();
  }

  document.addEventListener("DOMContentLoaded", () => {
    applyLanguage(chooseLanguage());
    for (const button of document.querySelectorAll("[data-set-lang]")) {
      button.addEventListener("click", () => {
        try {
          localStorage.setItem("lang", button.dataset.setLang);
        } catch (_) { /* storage disabled: the switch lasts for this page */ }
        applyLanguage(button.dataset.setLang);
      });
    }
    $("form").addEventListener("submit", generate);
    $("stop").addEventListener("click", stop);
    $("compare").addEventListener("change", () => {
      $("model").disabled = $("compare").checked; // every model answers in compare mode
    });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
    });
    loadInfo();
  });
})();
