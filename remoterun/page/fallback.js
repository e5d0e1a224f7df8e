"use strict";
// Runs only when the page's module never started (no module support, or app.js failed to
// load): lists recent tasks as links to their logs, and shows ?task={id}'s log as text.
addEventListener("load", function () {
  if (window.remoterun) return;
  document.getElementById("fallback").hidden = false;
  var id = new URLSearchParams(location.search).get("task");
  // The session key app.js keeps (util.js says why a cookie alone is not enough).
  var key = localStorage.getItem("remoterun.sessionKey");
  var init = { headers: key ? { "X-RemoteRun-Session-Key": key } : {} };
  var withKey = function (path) {
    return key ? path + "?session_key=" + encodeURIComponent(key) : path;
  };
  var strip = function (text) {
    return text.replace(/\x1b\[[0-9;?]*[ -\/]*[@-~]|\x1b\][^\x07]*\x07|\r/g, "");
  };
  if (id) {
    fetch("/tasks/" + encodeURIComponent(id) + "/output", init).then(function (r) { return r.text(); })
      .then(function (text) {
        var pre = document.getElementById("fallback-output");
        pre.textContent = strip(text);
        pre.hidden = false;
      });
  }
  fetch("/tasks?limit=50", init).then(function (r) { return r.json(); }).then(function (body) {
    var list = document.getElementById("fallback-tasks");
    (body.tasks || []).forEach(function (task) {
      var a = document.createElement("a");
      a.href = withKey("/tasks/" + task.id + "/output");
      a.textContent = task.script + " — " + task.status + " — " + task.created_at;
      var item = document.createElement("li");
      item.appendChild(a);
      list.appendChild(item);
    });
    if (body.error) list.textContent = body.message;
  });
});
