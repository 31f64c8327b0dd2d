// The access token of a server started with `layerwatch serve --token ...`.
//
// The token lives in localStorage (per server origin), so a page asks once
// and a reload does not ask again. When the server answers 401 (or closes
// /ws/live with CLOSE_UNAUTHORIZED), `askForToken` shows the small in-page
// form in index.html and resolves once a new token is stored; every caller
// that hit the 401 at the same time waits on that same form, then retries.
// A wrong token is not a dead end: the next 401 asks again, saying why.

const STORAGE_KEY = "layerwatch-token";

// /ws/live closes with this code when the token is missing or wrong (server/auth.py).
export const CLOSE_UNAUTHORIZED = 4401;

let memoryToken = null; // where localStorage is unavailable (some private modes)

export function storedToken() {
  try {
    return localStorage.getItem(STORAGE_KEY) || memoryToken;
  } catch {
    return memoryToken;
  }
}

function storeToken(token) {
  memoryToken = token;
  try {
    localStorage.setItem(STORAGE_KEY, token);
  } catch {
    /* kept in memory for this page */
  }
}

// The headers that carry the stored token, if there is one.
export function authHeaders() {
  const token = storedToken();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

let pending = null; // the open form's promise, shared by everyone waiting on it

// Show the token form with `reason` (the server's words) and resolve once a
// token was entered. The token that failed is the one in storage: saying
// "not accepted" only when there was one tells a first visit from a wrong token.
export function askForToken(reason) {
  if (pending) return pending;
  const overlay = document.getElementById("token-overlay");
  const form = document.getElementById("token-form");
  const input = document.getElementById("token-input");
  const message = document.getElementById("token-message");
  const hadToken = Boolean(storedToken());
  message.textContent = hadToken
    ? `The token was not accepted (${reason || "the server said 401"}). Enter it again.`
    : "Enter the token the server was started with (layerwatch serve --token ...).";
  message.dataset.kind = hadToken ? "wrong" : "ask";
  input.value = "";
  overlay.hidden = false;
  input.focus();
  pending = new Promise((resolve) => {
    const submit = (event) => {
      event.preventDefault();
      const token = input.value.trim();
      if (!token) {
        message.textContent = "The token cannot be empty.";
        message.dataset.kind = "wrong";
        return;
      }
      form.removeEventListener("submit", submit);
      storeToken(token);
      overlay.hidden = true;
      pending = null;
      resolve();
    };
    form.addEventListener("submit", submit);
  });
  return pending;
}
