// sessionmgr dashboard: plain JS over the JSON API, refreshed every few seconds.
"use strict";

const REFRESH_MS = 5000;
const LIVE_LIMIT = 200;
const ENDED_LIMIT = 15;
// The admin token, when the server has one: asked once, kept for this tab only (sessionStorage
// ends with the tab; nothing is written that outlives it). A link may carry it as
// #token=..., which never reaches the server and is removed from the address bar at once.
const TOKEN_KEY = "sessionmgr-admin-token";

function adoptTokenFromLink() {
  const match = /^#token=(.+)$/.exec(location.hash);
  if (!match) return;
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
  history.replaceState(null, "", location.pathname + location.search);
}

function askForToken(message) {
  const form = document.getElementById("signin");
  document.getElementById("signin-why").textContent = message;
  form.hidden = false;
  document.getElementById("token").focus();
}

function signIn(event) {
  event.preventDefault();
  const input = document.getElementById("token");
  const token = input.value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  input.value = "";
  document.getElementById("signin").hidden = true;
  refresh();
}

function human(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  const s = Math.abs(seconds);
  if (s < 60) return `${Math.floor(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${Math.floor(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

function since(now, iso) {
  return iso ? (now - Date.parse(iso)) / 1000 : null;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined || text === "" ? "–" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

async function getJson(url) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const resp = await fetch(url, { headers });
  if (resp.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken(token ? "That token was refused: try again." : "This server needs its admin token.");
    throw new Error("the admin token is needed (SESSIONMGR_ADMIN_TOKEN)");
  }
  const body = await resp.json();
  if (!resp.ok) throw new Error(`${url}: ${body.detail || resp.status}`);
  return body;
}

function fillCounts(stats) {
  for (const [status, count] of Object.entries(stats.by_status)) {
    const el = document.getElementById(`count-${status}`);
    if (el) el.textContent = count;
  }
  const today = stats.per_day[stats.per_day.length - 1];
  document.getElementById("credits-today").textContent =
    today && today.credits !== null ? today.credits.toFixed(2) : "–";
  document.getElementById("credits-known").textContent = stats.credits_known.toFixed(2);
  document.getElementById("cost-unknown").textContent =
    stats.cost_unknown ? ` (${stats.cost_unknown} without a cost yet)` : "";
}

function fillLive(page) {
  const now = Date.parse(page.now);
  const body = document.querySelector("#live tbody");
  body.replaceChildren();
  for (const s of page.items) {
    const tr = document.createElement("tr");
    tr.dataset.id = s.id;
    const left = s.deadline ? -since(now, s.deadline) : null;
    if (left !== null && left < 0) tr.classList.add("overdue");
    cell(tr, s.id);
    cell(tr, s.session_id || "(creating)", "sid");
    cell(tr, s.agent_id || (s.agent_image_url ? "image" : null));
    cell(tr, s.status, `status-${s.status}`);
    cell(tr, human(since(now, s.created_at)));
    cell(tr, human(since(now, s.last_activity_at)));
    const deadline = left === null ? "none" : left < 0 ? `overdue ${human(-left)}` : `in ${human(left)}`;
    cell(tr, deadline, "deadline").title = s.deadline || "";
    const room = cell(tr, "", "room");
    if (s.room_url) {
      const a = document.createElement("a");
      a.href = s.room_url;
      a.textContent = s.room_url;
      a.rel = "noreferrer";
      room.replaceChildren(a);
    }
    body.appendChild(tr);
  }
  document.getElementById("live-empty").hidden = page.items.length > 0;
  document.getElementById("live-count").textContent =
    page.next_cursor ? `(first ${page.items.length})` : `(${page.items.length})`;
}

function fillEnded(page) {
  const now = Date.parse(page.now);
  const body = document.querySelector("#ended tbody");
  body.replaceChildren();
  for (const s of page.items) {
    const tr = document.createElement("tr");
    cell(tr, s.id);
    cell(tr, s.session_id || "(never started)", "sid");
    cell(tr, s.agent_id || (s.agent_image_url ? "image" : null));
    cell(tr, s.ended_at ? `${human(since(now, s.ended_at))} ago` : null).title = s.ended_at || "";
    cell(tr, s.ended_at ? human((Date.parse(s.ended_at) - Date.parse(s.created_at)) / 1000) : null);
    cell(tr, s.end_reason, `status-${s.status}`);
    cell(tr, s.cost === null ? null : s.cost.toFixed(2));
    body.appendChild(tr);
  }
  document.getElementById("ended-empty").hidden = page.items.length > 0;
}

async function refresh() {
  const problem = document.getElementById("problem");
  try {
    const [stats, live, ended] = await Promise.all([
      getJson("/api/stats?days=1"),
      getJson(`/api/sessions?status=pending,active,ending&sort=-created_at&limit=${LIVE_LIMIT}`),
      getJson(`/api/sessions?status=ended,failed&sort=-ended_at&limit=${ENDED_LIMIT}`),
    ]);
    fillCounts(stats);
    fillLive(live);
    fillEnded(ended);
    problem.hidden = true;
    document.getElementById("updated").textContent =
      `updated ${new Date(Date.parse(live.now)).toISOString().slice(11, 19)} UTC`;
  } catch (err) {
    problem.textContent = `refresh failed: ${err.message}`;
    problem.hidden = false;
  }
}

adoptTokenFromLink();
document.getElementById("signin").addEventListener("submit", signIn);
refresh();
setInterval(refresh, REFRESH_MS);
