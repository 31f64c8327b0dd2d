// Runs before the page paints (a classic script in <head>): sets the theme
// so the page never flashes the wrong one. The choice persists in
// localStorage; with none made, the system's prefers-color-scheme decides.
(function () {
  let theme = null;
  try {
    theme = localStorage.getItem("layerwatch-theme");
  } catch {
    /* storage blocked: follow the system */
  }
  if (theme !== "dark" && theme !== "light") {
    theme = window.matchMedia && window.matchMedia("(prefers-color-scheme: light)").matches ? "light" : "dark";
  }
  document.documentElement.dataset.theme = theme;
})();
