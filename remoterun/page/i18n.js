// The page's words in English and Simplified Chinese. A dictionary per language and the
// browser's own Intl for dates and numbers: no library, no build step, nothing to fetch.
// The browser's language picks (zh, zh-CN, zh-Hans, zh-SG give Chinese); the header's switch
// keeps a choice in this origin's storage. Markup names its words with data-i18n="key" (the
// text) and data-i18n-attr="attr:key attr:key"; scripts call t("key", {name: value}).

export const STRINGS = {
  en: {
    "skip": "Skip to the terminal",
    "views": "Views",
    "view.console": "Console",
    "stats": "Stats",
    "logout": "Log out",
    "language": "Language",
    "login.title": "Log in",
    "login.token": "Token",
    "login.submit": "Log in",
    "run.title": "Run",
    "run.script": "Script",
    "run.pty": "PTY",
    "run.interactive": "Interactive",
    "run.priority": "Priority",
    "run.timeout": "Timeout (s)",
    "run.submit": "Run",
    "run.keys": "Ctrl+Enter runs",
    "history.title": "History",
    "history.filters": "Filter the history",
    "history.q": "search scripts",
    "history.q.label": "Search script names",
    "history.status": "Filter by status",
    "history.every_status": "every status",
    "history.script": "Filter by script",
    "history.every_script": "every script",
    "history.from": "From",
    "history.until": "Until",
    "history.by": "submitted by",
    "history.by.label": "Filter by submitter",
    "history.clear": "Clear",
    "history.tasks": "Tasks",
    "history.caption": "Tasks, newest first",
    "col.status": "status",
    "col.script": "script",
    "col.who": "who",
    "col.when": "when",
    "col.took": "took",
    "col.log": "log",
    "history.empty": "No task matches.",
    "history.newer": "← Newer",
    "history.older": "Older →",
    "task.none": "No task open",
    "task.label": "Task",
    "task.title": "Task {id}",
    "task.link": "Share link",
    "task.download": "Download log",
    "task.rerun": "Re-run",
    "task.cancel": "Cancel",
    "task.details": "Task details",
    "task.params": "Params",
    "task.attempts": "Attempts",
    "col.exit": "exit",
    "col.error": "error",
    "col.start": "start",
    "col.end": "end",
    "task.downloads": "Download",
    "task.exit": "exit {code}",
    "task.queue": "#{n} in the queue",
    "keys.leave": "Esc leaves the terminal",
    "keys.leave_pty": "Shift+Esc leaves the terminal (Esc goes to the program)",
    "find.label": "Find in the whole log",
    "find.placeholder": "Find in the log",
    "find.prev": "Previous match",
    "find.next": "Next match",
    "find.close": "Close find",
    "find.none": "no match",
    "find.count": "{i} of {n} · line {line}",
    "to_end": "Back to the end, live ↓",
    "reconnecting": "{reason}; reconnecting…",
    "closed": "connection closed ({code})",
    "no_answer": "no answer from the server",
    "failed_start": "The page failed to start: {message}",
    "live.live": "live",
    "live.reconnecting": "reconnecting…",
    "fallback.title": "Plain view",
    "fallback.text": "The live terminal could not start in this browser; here are the logs as plain text.",
    "status.pending": "pending",
    "status.running": "running",
    "status.success": "success",
    "status.failed": "failed",
    "status.timeout": "timeout",
    "status.cancelled": "cancelled",
    "dur.s": "{s} s",
    "dur.ms": "{m}m {s}s",
    "dur.hm": "{h}h {m}m",
  },
  "zh-CN": {
    "skip": "跳到终端",
    "views": "视图",
    "view.console": "控制台",
    "stats": "统计",
    "logout": "退出登录",
    "language": "语言",
    "login.title": "登录",
    "login.token": "令牌",
    "login.submit": "登录",
    "run.title": "运行",
    "run.script": "脚本",
    "run.pty": "PTY 终端",
    "run.interactive": "交互式",
    "run.priority": "优先级",
    "run.timeout": "超时（秒）",
    "run.submit": "运行",
    "run.keys": "Ctrl+Enter 运行",
    "history.title": "历史",
    "history.filters": "筛选历史任务",
    "history.q": "搜索脚本",
    "history.q.label": "按脚本名搜索",
    "history.status": "按状态筛选",
    "history.every_status": "全部状态",
    "history.script": "按脚本筛选",
    "history.every_script": "全部脚本",
    "history.from": "开始",
    "history.until": "结束",
    "history.by": "提交人",
    "history.by.label": "按提交人筛选",
    "history.clear": "清除",
    "history.tasks": "任务",
    "history.caption": "任务，最新的在前",
    "col.status": "状态",
    "col.script": "脚本",
    "col.who": "提交人",
    "col.when": "时间",
    "col.took": "耗时",
    "col.log": "日志",
    "history.empty": "没有匹配的任务。",
    "history.newer": "← 较新",
    "history.older": "较早 →",
    "task.none": "未打开任务",
    "task.label": "任务",
    "task.title": "任务 {id}",
    "task.link": "分享链接",
    "task.download": "下载日志",
    "task.rerun": "重新运行",
    "task.cancel": "取消",
    "task.details": "任务详情",
    "task.params": "参数",
    "task.attempts": "执行记录",
    "col.exit": "退出码",
    "col.error": "错误",
    "col.start": "开始",
    "col.end": "结束",
    "task.downloads": "下载",
    "task.exit": "退出码 {code}",
    "task.queue": "排队第 {n} 位",
    "keys.leave": "按 Esc 离开终端",
    "keys.leave_pty": "按 Shift+Esc 离开终端（Esc 会发给程序）",
    "find.label": "在整个日志中查找",
    "find.placeholder": "在日志中查找",
    "find.prev": "上一个匹配",
    "find.next": "下一个匹配",
    "find.close": "关闭查找",
    "find.none": "无匹配",
    "find.count": "第 {i} / {n} 处 · 第 {line} 行",
    "to_end": "回到末尾，实时跟随 ↓",
    "reconnecting": "{reason}；正在重连…",
    "closed": "连接已关闭（{code}）",
    "no_answer": "服务器无响应",
    "failed_start": "页面启动失败：{message}",
    "live.live": "实时",
    "live.reconnecting": "正在重连…",
    "fallback.title": "纯文本视图",
    "fallback.text": "此浏览器无法启动实时终端，以下是纯文本日志。",
    "status.pending": "排队中",
    "status.running": "运行中",
    "status.success": "成功",
    "status.failed": "失败",
    "status.timeout": "超时",
    "status.cancelled": "已取消",
    "dur.s": "{s} 秒",
    "dur.ms": "{m} 分 {s} 秒",
    "dur.hm": "{h} 小时 {m} 分",
  },
};

export const LANGUAGES = { en: "English", "zh-CN": "简体中文" };
const STORED = "remoterun.lang";

// The language: the header's stored choice, else the first of the browser's we speak.
export function pick(languages = navigator.languages ?? [navigator.language]) {
  const stored = localStorage.getItem(STORED);
  if (stored in STRINGS) return stored;
  for (const tag of languages) {
    if (/^zh(-(cn|sg|hans)(-.*)?)?$/i.test(tag)) return "zh-CN";
    if (/^en\b/i.test(tag)) return "en";
  }
  return "en";
}

export const lang = pick();

export function t(key, vars = {}) {
  const text = STRINGS[lang][key] ?? STRINGS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(vars[name] ?? ""));
}

// Put the words into the markup under `root`, and the switch into the header.
export function translate(root = document) {
  document.documentElement.lang = lang;
  for (const node of root.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  for (const node of root.querySelectorAll("[data-i18n-attr]")) {
    for (const pair of node.dataset.i18nAttr.split(" ")) {
      const [attr, key] = pair.split(":");
      node.setAttribute(attr, t(key));
    }
  }
  const choice = root.querySelector?.("#lang");
  if (choice && !choice.options.length) {
    for (const [value, name] of Object.entries(LANGUAGES)) choice.add(new Option(name, value));
    choice.value = lang;
    choice.addEventListener("change", () => {
      localStorage.setItem(STORED, choice.value);
      location.reload(); // every word drawn so far, in the other language
    });
  }
}
