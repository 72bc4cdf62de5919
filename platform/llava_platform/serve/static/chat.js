// The LLaVA chat page: talks to the OpenAI-compatible API of the Gateway that served it
// ({root}/v1/models, {root}/v1/chat/completions with stream: true). No build step, no dependencies.
"use strict";

(() => {
  const root = document.body.dataset.root || "";
  const KEY_STORE = "llava-platform.api-key." + (root || "/");
  const $ = (id) => document.getElementById(id);
  const el = {
    model: $("model"), status: $("status"), log: $("log"), hint: $("empty-hint"),
    keyBar: $("key-bar"), keyForm: $("key-form"), key: $("api-key"), changeKey: $("change-key"),
    composer: $("composer"), drop: $("drop"), file: $("image-input"), dropText: $("drop-text"),
    preview: $("preview"), previewImg: $("preview-img"), previewName: $("preview-name"), removeImage: $("remove-image"),
    prompt: $("prompt"), send: $("send"), stop: $("stop"), regenerate: $("regenerate"), clear: $("clear"),
    temperature: $("temperature"), temperatureValue: $("temperature-value"),
    topP: $("top-p"), topPValue: $("top-p-value"), maxTokens: $("max-tokens"),
  };

  const state = {
    model: null,           // the id /v1/models lists
    key: sessionStorage.getItem(KEY_STORE) || "",
    messages: [],          // the conversation in OpenAI's message format
    image: null,           // {name, url} of the image to send with the next question
    busy: false,
    controller: null,      // AbortController of the request in flight
  };

  // ------------------------------------------------------------------ API errors

  class ApiFailure extends Error {
    constructor(message, status, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // An OpenAI-shaped error body ({"error": {"message", "code"}}) or anything else, as readable text.
  async function failureOf(response) {
    let message = "", code = null;
    try {
      const body = await response.json();
      if (body && body.error) {
        message = body.error.message || "";
        code = body.error.code || null;
      }
    } catch (e) { /* not JSON: a proxy's error page */ }
    if (!message) message = `the server answered ${response.status} ${response.statusText || ""}`.trim();
    return new ApiFailure(message, response.status, code);
  }

  function describe(err) {
    if (err instanceof ApiFailure) {
      const what = err.status === 401 ? "The API key was refused"
        : err.status === 413 ? "The request is too large"
        : err.status >= 500 ? "The server failed"
        : err.status ? "The server rejected the request" : "The answer stopped";
      const tag = [err.status, err.code].filter(Boolean).join(" ");
      return `${what}${tag ? ` (${tag})` : ""}: ${err.message}`;
    }
    if (err instanceof TypeError) return `Cannot reach the endpoint at ${location.origin}${root}/v1: ${err.message}`;
    return String(err && err.message ? err.message : err);
  }

  function headers() {
    const h = {"Content-Type": "application/json"};
    if (state.key) h["Authorization"] = `Bearer ${state.key}`;
    return h;
  }

  // ------------------------------------------------------------------ connection and model name

  function notConnected(text) {
    el.model.textContent = "not connected";
    showError(text);
    setStatus("");
  }

  async function connect() {
    setStatus("connecting…");
    let response;
    try {
      response = await fetch(`${root}/v1/models`, {headers: headers()});
    } catch (err) {
      notConnected(describe(err));
      return;
    }
    if (response.status === 401) {
      el.model.textContent = "API key needed";
      el.keyBar.hidden = false;
      el.key.focus();
      setStatus(state.key ? "the API key was refused" : "");
      return;
    }
    if (!response.ok) {
      notConnected(describe(await failureOf(response)));
      return;
    }
    const body = await response.json();
    state.model = body.data && body.data.length ? body.data[0].id : null;
    el.model.textContent = state.model || "no model";
    el.model.classList.add("connected");
    el.keyBar.hidden = true;
    setStatus("");
    updateButtons();
  }

  el.keyForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = el.key.value.trim();
    if (state.key) sessionStorage.setItem(KEY_STORE, state.key); else sessionStorage.removeItem(KEY_STORE);
    connect();
  });
  el.changeKey.addEventListener("click", () => {
    el.keyBar.hidden = false;
    el.key.value = state.key;
    el.key.focus();
  });

  // ------------------------------------------------------------------ image: drop, choose, paste

  function setImage(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`${file.name} is not an image (${file.type}); choose a PNG, JPEG, GIF or WebP file.`);
      return;
    }
    const reader = new FileReader();
    reader.onload = () => {
      state.image = {name: file.name || "pasted image", url: reader.result};
      showImage();
    };
    reader.onerror = () => showError(`Cannot read ${file.name}: ${reader.error}`);
    reader.readAsDataURL(file);
  }

  function showImage() {
    const has = Boolean(state.image);
    el.preview.hidden = !has;
    el.dropText.hidden = has;
    if (has) {
      el.previewImg.src = state.image.url;
      el.previewName.textContent = state.image.name;
    } else {
      el.previewImg.removeAttribute("src");
    }
    el.file.value = "";
  }

  el.previewImg.addEventListener("error", () => {
    if (state.image) el.previewName.textContent = `${state.image.name} (the browser cannot show this file)`;
  });
  el.drop.addEventListener("click", (ev) => {
    if (ev.target !== el.removeImage) el.file.click();
  });
  el.drop.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); el.file.click(); }
  });
  el.file.addEventListener("change", () => setImage(el.file.files[0]));
  el.removeImage.addEventListener("click", (ev) => { ev.stopPropagation(); state.image = null; showImage(); });
  for (const type of ["dragenter", "dragover"]) {
    el.composer.addEventListener(type, (ev) => { ev.preventDefault(); el.drop.classList.add("over"); });
  }
  el.composer.addEventListener("dragleave", () => el.drop.classList.remove("over"));
  el.composer.addEventListener("drop", (ev) => {
    ev.preventDefault();
    el.drop.classList.remove("over");
    const file = ev.dataTransfer && ev.dataTransfer.files[0];
    if (file) setImage(file);
  });
  el.prompt.addEventListener("paste", (ev) => {
    const item = [...(ev.clipboardData ? ev.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) { ev.preventDefault(); setImage(item.getAsFile()); }
  });

  // ------------------------------------------------------------------ the conversation on screen

  function bubble(role, text, imageUrl) {
    el.hint.hidden = true;
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    div.dataset.role = role;
    if (imageUrl) {
      const img = document.createElement("img");
      img.src = imageUrl;
      img.alt = "the image sent with this question";
      div.appendChild(img);
    }
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    div.appendChild(body);
    el.log.appendChild(div);
    el.log.scrollTop = el.log.scrollHeight;
    return div;
  }

  function showError(text) {
    const div = bubble("error", text);
    div.setAttribute("role", "alert");
    return div;
  }

  function setStatus(text) { el.status.textContent = text; }

  function updateButtons() {
    el.send.disabled = state.busy || !state.model;
    el.stop.hidden = !state.busy;
    el.send.hidden = state.busy;
    const last = state.messages[state.messages.length - 1];
    el.regenerate.disabled = state.busy || !last;
    el.clear.disabled = state.busy;
  }

  function settings() {
    const maxTokens = parseInt(el.maxTokens.value, 10);
    return {
      temperature: parseFloat(el.temperature.value),
      top_p: parseFloat(el.topP.value),
      max_tokens: Number.isFinite(maxTokens) ? maxTokens : undefined,
    };
  }

  function showSettings() {
    el.temperatureValue.textContent = parseFloat(el.temperature.value).toFixed(2);
    el.topPValue.textContent = parseFloat(el.topP.value).toFixed(2);
  }
  el.temperature.addEventListener("input", showSettings);
  el.topP.addEventListener("input", showSettings);

  // ------------------------------------------------------------------ streaming one answer

  // POSTs the conversation with stream: true and calls onText with each piece of the answer as it
  // arrives (Server-Sent Events: "data: {chunk}" lines, an error object, then "data: [DONE]").
  async function stream(messages, onText) {
    state.controller = new AbortController();
    const response = await fetch(`${root}/v1/chat/completions`, {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({model: state.model, messages, stream: true,
                            stream_options: {include_usage: true}, ...settings()}),
      signal: state.controller.signal,
    });
    if (!response.ok) throw await failureOf(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", finish = null, usage = null;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return {finish, usage};
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiFailure(chunk.error.message, 0, chunk.error.code);
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) onText(choice.delta.content);
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
    throw new ApiFailure("the connection closed before the answer finished", 0, "incomplete");
  }

  // Answers the conversation as it stands (its last message is the user's). Returns null when an
  // answer was added to the conversation, or what went wrong, as readable text.
  async function answer() {
    state.busy = true;
    updateButtons();
    setStatus("generating…");
    const div = bubble("assistant", "");
    div.dataset.state = "streaming";
    const textEl = div.querySelector(".text");
    let text = "";
    try {
      const {finish, usage} = await stream(state.messages, (piece) => {
        text += piece;
        // Shown without the leading space many tokenizers put before the first word; the history
        // keeps the model's text as it was generated.
        textEl.textContent = text.trimStart();
        el.log.scrollTop = el.log.scrollHeight;
      });
      finishAnswer(div, text, finish === "length" ? "stopped at the max output tokens" : "", usage);
      return null;
    } catch (err) {
      if (err.name === "AbortError") {
        finishAnswer(div, text, "stopped", null);
        return null;
      }
      div.remove();
      if (err.status === 401) el.keyBar.hidden = false;  // the key changed or was never entered
      return describe(err);
    } finally {
      state.busy = false;
      state.controller = null;
      setStatus("");
      updateButtons();
    }
  }

  function finishAnswer(div, text, note, usage) {
    state.messages.push({role: "assistant", content: text});
    div.dataset.state = "done";
    const n = usage ? usage.completion_tokens : null;
    const parts = [note, n === null ? "" : `${n} token${n === 1 ? "" : "s"}`].filter(Boolean);
    if (parts.length) {
      const meta = document.createElement("div");
      meta.className = "meta";
      meta.textContent = parts.join(" · ");
      div.appendChild(meta);
    }
  }

  async function send() {
    const text = el.prompt.value.trim();
    if (state.busy || !state.model) return;
    if (!text) { el.prompt.focus(); setStatus("type a question first"); return; }
    const image = state.image;
    const content = image ? [{type: "image_url", image_url: {url: image.url}}, {type: "text", text}] : text;
    state.messages.push({role: "user", content});
    const userDiv = bubble("user", text, image && image.url);
    el.prompt.value = "";
    state.image = null;
    showImage();
    const failure = await answer();
    if (failure) {
      // Not answered: the question leaves the conversation and goes back into the composer, so that
      // it can be fixed (another image, fewer tokens) and sent again; nothing typed is lost.
      state.messages.pop();
      userDiv.remove();
      showError(`${failure}\nYour question is back in the text box.`);
      if (!el.prompt.value) el.prompt.value = text;
      if (!state.image && image) { state.image = image; showImage(); }
      updateButtons();
    }
  }

  // Drops the last answer (if the conversation ends with one) and asks again.
  async function regenerate() {
    if (state.busy || !state.messages.length) return;
    if (state.messages[state.messages.length - 1].role === "assistant") {
      state.messages.pop();
      const answers = el.log.querySelectorAll(".msg.assistant");
      if (answers.length) answers[answers.length - 1].remove();
    }
    for (const e of el.log.querySelectorAll(".msg.error")) e.remove();
    const failure = await answer();
    if (failure) showError(failure);
  }

  function clear() {
    if (state.busy) return;
    state.messages = [];
    for (const m of el.log.querySelectorAll(".msg")) m.remove();
    el.hint.hidden = false;
    setStatus("");
    updateButtons();
    el.prompt.focus();
  }

  el.composer.addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
  el.prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send(); }
  });
  el.stop.addEventListener("click", () => state.controller && state.controller.abort());
  el.regenerate.addEventListener("click", regenerate);
  el.clear.addEventListener("click", clear);

  showSettings();
  updateButtons();
  connect();
})();
