/* traffic-shaper ops dashboard.
 *
 * Static: no build step, no framework, nothing fetched from elsewhere (the CSP allows only
 * this origin). Live data comes from the Server-Sent Events stream /api/stream (a `snapshot`
 * event every second); when the stream fails the page polls /api/dashboard/snapshot every
 * 5 s and tries the stream again now and then. Charts are seeded from
 * /api/observability/history and extended with each snapshot's `history_point`.
 * Actions call the same admin API as the `shaper` CLI, with the admin token kept in this
 * tab's sessionStorage.
 */
(function () {
  'use strict';

  var STREAM_URL = '/api/stream';
  var SNAPSHOT_URL = '/api/dashboard/snapshot';
  var HISTORY_URL = '/api/observability/history';
  var POLL_MS = 5000;
  var STALE_MS = 10000;
  var STREAM_RETRY_MS = 30000;
  var KEEP_SECONDS = 900;
  var TOKEN_KEY = 'shaper.adminToken';
  var VARIANTS = ['stable', 'canary'];
  var COLORS = { stable: '#58a6ff', canary: '#f0a33a' };

  var state = {
    snapshot: null,
    lastFresh: 0, // Date.now() when the last snapshot arrived
    started: Date.now(),
    source: null, // the EventSource, while it is open or opening
    streamTried: 0,
    pollTimer: null,
    unreachable: false,
    unreachableError: '',
    feed: 'connecting',
    lastT: 0, // the newest history point appended
    store: {}, // route -> {t: [], stable: {...}, canary: {...}}
    cards: {}, // route -> card parts
    charts: {}, // route -> {traffic, errors, latency, saturation}: uPlot instances
    appended: 0,
    renders: 0,
  };
  // For the browser tests and for curious operators in the console.
  window.__dashboard = state;

  /* ---------- small helpers ---------- */

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, attrs) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (key) {
        var value = attrs[key];
        if (value === null || value === undefined || value === false) return;
        if (key === 'text') node.textContent = value;
        else if (key === 'className') node.className = value;
        else node.setAttribute(key, value === true ? '' : String(value));
      });
    }
    for (var i = 2; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === 'string' ? document.createTextNode(child) : child);
    }
    return node;
  }

  function setText(node, text) {
    text = String(text);
    if (node.textContent !== text) node.textContent = text;
  }

  function setBadge(node, text, kind) {
    setText(node, text);
    var cls = 'badge ' + kind;
    if (node.className !== cls) node.className = cls;
  }

  function slug(text) {
    return String(text).replace(/[^A-Za-z0-9_-]/g, '_');
  }

  function num(value) {
    if (value === null || value === undefined || isNaN(value)) return '–';
    return String(Number(Number(value).toFixed(2)));
  }

  function fmtRate(value) {
    if (value === null || value === undefined) return '–';
    if (value >= 100) return value.toFixed(0);
    if (value >= 10) return value.toFixed(1);
    return value.toFixed(2);
  }

  function fmtPct(rate) {
    if (rate === null || rate === undefined) return '–';
    return (rate * 100).toFixed(2) + '%';
  }

  function fmtMs(value) {
    if (value === null || value === undefined) return '–';
    return (value >= 100 ? value.toFixed(0) : value.toFixed(1)) + ' ms';
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || isNaN(seconds)) return '–';
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 60) return seconds + ' s';
    var m = Math.floor(seconds / 60);
    var s = seconds % 60;
    if (m < 60) return m + 'm ' + (s < 10 ? '0' : '') + s + 's';
    var h = Math.floor(m / 60);
    m = m % 60;
    return h + 'h ' + (m < 10 ? '0' : '') + m + 'm';
  }

  function clock(t) {
    if (!t) return '–';
    return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  }

  function isoTime(t) {
    return new Date(t * 1000).toISOString();
  }

  /** Keep `container`'s children one per item, keyed; focus inside kept rows survives. */
  function syncKeyed(container, items, keyOf, create, update) {
    var existing = {};
    Array.prototype.forEach.call(container.children, function (child) {
      existing[child.dataset.key] = child;
    });
    var wanted = {};
    items.forEach(function (item, index) {
      var key = keyOf(item);
      wanted[key] = true;
      var node = existing[key];
      if (!node) {
        node = create(item);
        node.dataset.key = key;
      }
      update(node, item);
      if (container.children[index] !== node) {
        container.insertBefore(node, container.children[index] || null);
      }
    });
    Object.keys(existing).forEach(function (key) {
      if (!wanted[key]) existing[key].remove();
    });
  }

  /* ---------- history and charts ---------- */

  function emptySeries() {
    return { rps: [], err: [], p50: [], p99: [], inflight: [] };
  }

  function storeFor(route) {
    if (!state.store[route]) {
      state.store[route] = { t: [], stable: emptySeries(), canary: emptySeries() };
    }
    return state.store[route];
  }

  function appendPoint(point) {
    if (!point || typeof point.t !== 'number' || point.t <= state.lastT) return false;
    state.lastT = point.t;
    var routes = point.routes || {};
    Object.keys(routes).forEach(function (route) {
      var store = storeFor(route);
      store.t.push(point.t);
      VARIANTS.forEach(function (variant) {
        var v = routes[route][variant];
        var s = store[variant];
        s.rps.push(v ? v.rps : null);
        s.err.push(v ? v.error_rate * 100 : null);
        s.p50.push(v ? v.p50_ms : null);
        s.p99.push(v ? v.p99_ms : null);
        s.inflight.push(v ? v.in_flight : null);
      });
    });
    // Forget what is older than 15 minutes (and routes that are gone).
    Object.keys(state.store).forEach(function (route) {
      var store = state.store[route];
      var cut = 0;
      while (cut < store.t.length && store.t[cut] < point.t - KEEP_SECONDS) cut++;
      if (cut) {
        store.t.splice(0, cut);
        VARIANTS.forEach(function (variant) {
          Object.keys(store[variant]).forEach(function (k) {
            store[variant][k].splice(0, cut);
          });
        });
      }
      if (!store.t.length) delete state.store[route];
    });
    state.appended++;
    return true;
  }

  var CHARTS = [
    {
      key: 'traffic',
      title: 'Traffic (req/s)',
      series: [{ variant: 'stable', field: 'rps' }, { variant: 'canary', field: 'rps' }],
      fmt: fmtRate,
    },
    {
      key: 'errors',
      title: 'Errors (%)',
      series: [{ variant: 'stable', field: 'err' }, { variant: 'canary', field: 'err' }],
      fmt: function (v) {
        return v === null || v === undefined ? '–' : v.toFixed(2) + '%';
      },
    },
    {
      key: 'latency',
      title: 'Latency p50 / p99 (ms)',
      series: [
        { variant: 'stable', field: 'p50' },
        { variant: 'stable', field: 'p99', dash: [4, 3] },
        { variant: 'canary', field: 'p50' },
        { variant: 'canary', field: 'p99', dash: [4, 3] },
      ],
      fmt: function (v) {
        return v === null || v === undefined ? '–' : v.toFixed(1);
      },
    },
    {
      key: 'saturation',
      title: 'Saturation (in flight)',
      series: [
        { variant: 'stable', field: 'inflight' },
        { variant: 'canary', field: 'inflight' },
      ],
      fmt: function (v) {
        return v === null || v === undefined ? '–' : String(Math.round(v * 10) / 10);
      },
    },
  ];

  function chartSeries(def, variants) {
    return def.series.filter(function (s) {
      return variants.indexOf(s.variant) >= 0;
    });
  }

  function chartData(route, def, variants) {
    var store = storeFor(route);
    var data = [store.t];
    chartSeries(def, variants).forEach(function (s) {
      data.push(store[s.variant][s.field]);
    });
    return data;
  }

  function makeChart(route, def, variants, target) {
    if (typeof window.uPlot !== 'function') return null;
    var axis = {
      stroke: '#9da7b3',
      grid: { stroke: '#2a313a', width: 1 },
      ticks: { stroke: '#2a313a', width: 1 },
      font: '11px system-ui, sans-serif',
    };
    var series = [{}];
    chartSeries(def, variants).forEach(function (s) {
      series.push({
        label: s.variant + (def.key === 'latency' ? ' ' + s.field : ''),
        stroke: COLORS[s.variant],
        width: 1.5,
        dash: s.dash,
        points: { show: false },
        value: function (u, v) {
          return def.fmt(v);
        },
      });
    });
    var opts = {
      width: Math.max(200, target.clientWidth || 260),
      height: 140,
      series: series,
      legend: { show: true, live: true },
      cursor: { drag: { x: false, y: false } },
      scales: {
        x: { time: true },
        y: {
          range: function (u, min, max) {
            return [0, max && max > 0 ? max * 1.15 : 1];
          },
        },
      },
      axes: [
        Object.assign({ size: 30 }, axis),
        Object.assign(
          {
            size: 54,
            values: function (u, values) {
              return values.map(function (v) {
                return def.fmt(v);
              });
            },
          },
          axis
        ),
      ],
    };
    var chart = new window.uPlot(opts, chartData(route, def, variants), target);
    if (window.ResizeObserver) {
      new ResizeObserver(function () {
        var width = Math.max(200, target.clientWidth);
        if (Math.abs(width - chart.width) > 2) chart.setSize({ width: width, height: 140 });
      }).observe(target);
    }
    return chart;
  }

  function refreshCharts() {
    Object.keys(state.charts).forEach(function (route) {
      var card = state.cards[route];
      var charts = state.charts[route];
      CHARTS.forEach(function (def) {
        if (charts[def.key]) charts[def.key].setData(chartData(route, def, card.variants));
      });
    });
  }

  /* ---------- route cards ---------- */

  function buildCard(route, variants, hasRollout) {
    var id = slug(route);
    var parts = { route: route, variants: variants, hasRollout: hasRollout, cells: {} };
    var card = el('article', {
      className: 'card route',
      id: 'route-' + id,
      'aria-labelledby': 'route-title-' + id,
      'data-route': route,
    });
    parts.card = card;

    parts.status = el('span', { className: 'badge', 'data-testid': 'status-' + id });
    parts.weight = el('strong', { 'data-testid': 'weight-' + id });
    parts.step = el('span', { 'data-testid': 'step-' + id });
    card.appendChild(
      el(
        'div',
        { className: 'route-head' },
        el('h2', { id: 'route-title-' + id, text: route }),
        parts.status,
        (parts.weightWrap = el('span', null, 'canary weight ', parts.weight)),
        parts.step
      )
    );

    var body = el('div', { className: 'route-body' });
    card.appendChild(body);

    // Rollout: progress, verdict, gates, actions.
    if (hasRollout) {
      var panel = el('section', { className: 'panel', 'aria-label': route + ' rollout' });
      body.appendChild(panel);
      parts.upstreams = el('dd');
      parts.hold = el('span', { 'data-testid': 'hold-' + id });
      parts.bar = el('span');
      parts.barWrap = el('div', {
        className: 'progress',
        role: 'progressbar',
        'aria-label': route + ' step hold progress',
        'aria-valuemin': '0',
        'aria-valuemax': '100',
      }, parts.bar);
      parts.verdict = el('span', { className: 'badge', 'data-testid': 'verdict-' + id });
      parts.verdictReason = el('span', { 'data-testid': 'verdict-reason-' + id });
      parts.reason = el('dd', { 'data-testid': 'reason-' + id });
      parts.onBreach = el('dd');
      panel.appendChild(
        el(
          'dl',
          { className: 'kv' },
          el('div', null, el('dt', { text: 'Versions' }), parts.upstreams),
          el('div', null, el('dt', { text: 'Step progress' }), el('dd', null, parts.hold, parts.barWrap)),
          el('div', null, el('dt', { text: 'Analysis' }),
            el('dd', null, parts.verdict, ' ', parts.verdictReason)),
          el('div', null, el('dt', { text: 'Last change' }), parts.reason),
          el('div', null, el('dt', { text: 'On breach' }), parts.onBreach)
        )
      );

      panel.appendChild(el('h3', { text: 'Health gates' }));
      parts.gates = el('ul', {
        className: 'gates',
        'aria-label': route + ' health gates',
        'data-testid': 'gates-' + id,
      });
      panel.appendChild(parts.gates);

      parts.buttons = {};
      var actions = el('div', { className: 'actions', role: 'group', 'aria-label': route + ' actions' });
      [
        ['pause', 'Pause'],
        ['resume', 'Resume'],
        ['promote', 'Promote'],
        ['rollback', 'Roll back'],
        ['retry', 'Retry'],
      ].forEach(function (pair) {
        var button = el('button', {
          type: 'button',
          className: pair[0] === 'rollback' ? 'danger' : null,
          'data-action': pair[0],
          'data-route': route,
          'data-testid': pair[0] + '-' + id,
          'aria-label': pair[1] + ' the ' + route + ' rollout',
          text: pair[1],
        });
        parts.buttons[pair[0]] = button;
        actions.appendChild(button);
      });
      panel.appendChild(actions);
    } else {
      parts.plain = el('span', { className: 'muted' });
      parts.weightWrap.hidden = true;
      card.firstChild.appendChild(parts.plain);
    }

    // Golden signals, stable and canary side by side.
    var signals = el('section', { className: 'panel', 'aria-label': route + ' golden signals' });
    body.appendChild(signals);
    var head = el('tr', null, el('th', { scope: 'col', text: 'Last minute' }));
    variants.forEach(function (variant) {
      parts.cells[variant] = {};
      head.appendChild(el('th', { scope: 'col', className: 'col ' + variant, text: variant }));
    });
    var tbody = el('tbody');
    [
      ['rps', 'Traffic'],
      ['errors', 'Errors'],
      ['latency', 'Latency p50 / p99'],
      ['saturation', 'Saturation'],
    ].forEach(function (row) {
      var tr = el('tr', null, el('th', { scope: 'row', text: row[1] }));
      variants.forEach(function (variant) {
        var main = el('span', { 'data-testid': row[0] + '-' + id + '-' + variant });
        var sub = el('span', { className: 'sub', 'data-testid': row[0] + '-sub-' + id + '-' + variant });
        parts.cells[variant][row[0]] = { main: main, sub: sub };
        tr.appendChild(el('td', null, main, sub));
      });
      tbody.appendChild(tr);
    });
    parts.connections = el('p', { className: 'muted' });
    signals.appendChild(
      el(
        'div',
        { className: 'table-wrap' },
        el('table', { className: 'table signals', 'aria-label': route + ' golden signals, last minute' },
          el('thead', null, head), tbody)
      )
    );
    signals.appendChild(parts.connections);

    // Charts of the last 15 minutes.
    var charts = el('div', { className: 'charts' });
    parts.plots = {};
    CHARTS.forEach(function (def) {
      var plot = el('div', { className: 'plot', 'data-testid': 'chart-' + def.key + '-' + id });
      parts.plots[def.key] = plot;
      charts.appendChild(
        el(
          'figure',
          { className: 'chart', role: 'group', 'aria-label': route + ' ' + def.title + ', last 15 minutes' },
          el('h3', { text: def.title }),
          plot
        )
      );
    });
    card.appendChild(el('h3', { text: 'Last 15 minutes' }));
    card.appendChild(charts);
    return parts;
  }

  function ensureCard(route, variants, hasRollout, index) {
    var container = $('routes');
    var parts = state.cards[route];
    var shape = variants.join(',') + '|' + hasRollout;
    if (parts && parts.shape !== shape) {
      dropCard(route);
      parts = null;
    }
    if (!parts) {
      parts = buildCard(route, variants, hasRollout);
      parts.shape = shape;
      state.cards[route] = parts;
    }
    var wantedAt = container.querySelectorAll(':scope > article')[index];
    if (wantedAt !== parts.card) container.insertBefore(parts.card, wantedAt || null);
    if (!state.charts[route]) {
      var charts = {};
      CHARTS.forEach(function (def) {
        charts[def.key] = makeChart(route, def, variants, parts.plots[def.key]);
      });
      state.charts[route] = charts;
    }
    return parts;
  }

  function dropCard(route) {
    var charts = state.charts[route];
    if (charts) {
      Object.keys(charts).forEach(function (k) {
        if (charts[k]) charts[k].destroy();
      });
    }
    delete state.charts[route];
    if (state.cards[route]) state.cards[route].card.remove();
    delete state.cards[route];
  }

  function poolUse(snap, upstream) {
    var pools = (snap.signals.saturation || {}).upstream_pools || {};
    var pool = pools[upstream];
    if (!pool) return null;
    var urls = Object.keys(pool.endpoints || {});
    var used = urls.reduce(function (sum, url) {
      return sum + (pool.endpoints[url].in_use || 0);
    }, 0);
    return { used: used, limit: pool.limit_per_endpoint * urls.length };
  }

  function renderRollout(parts, rollout, snap) {
    var id = slug(parts.route);
    setBadge(parts.status, rollout.status.replace('_', ' '), rollout.status);
    setText(parts.weight, num(rollout.weight) + '%');
    var steps = rollout.steps || [];
    setText(parts.step, steps.length ? 'step ' + (rollout.step + 1) + '/' + steps.length : 'fixed weight');
    setText(parts.upstreams, rollout.stable + ' (stable) · ' + rollout.canary + ' (canary)');

    var holdText;
    var fraction = 0;
    if (!steps.length) {
      holdText = 'fixed weight of ' + num(rollout.config_weight) + '%, no steps';
      fraction = rollout.status === 'promoted' ? 1 : 0;
    } else if (rollout.status === 'promoted') {
      holdText = 'all ' + steps.length + ' steps done';
      fraction = 1;
    } else if (rollout.status === 'rolled_back') {
      holdText = 'rolled back at step ' + (rollout.step + 1) + '/' + steps.length;
    } else {
      var step = steps[Math.min(rollout.step, steps.length - 1)];
      var elapsed = Math.max(0, snap.time - rollout.step_started);
      var left = Math.max(0, step.hold - elapsed);
      fraction = step.hold > 0 ? Math.min(1, elapsed / step.hold) : 1;
      if (rollout.status === 'paused') {
        holdText = 'paused at step ' + (rollout.step + 1) + ' (' + num(step.weight) + '%)';
      } else if (left > 0) {
        holdText = fmtDuration(left) + ' left of the ' + fmtDuration(step.hold) + ' hold at ' + num(step.weight) + '%';
      } else {
        holdText = 'hold done; advances when the analysis is healthy and every gate passes';
      }
    }
    if (rollout.status === 'paused' && rollout.auto_resume) {
      holdText += '; resumes by itself once the incident has cleared';
    }
    setText(parts.hold, holdText);
    parts.barWrap.hidden = !steps.length;
    parts.bar.style.width = Math.round(fraction * 100) + '%';
    parts.barWrap.setAttribute('aria-valuenow', String(Math.round(fraction * 100)));

    setBadge(parts.verdict, rollout.verdict, rollout.verdict === 'healthy' ? 'healthy-verdict' : rollout.verdict);
    setText(parts.verdictReason, rollout.verdict_reason || '');
    setText(parts.reason, (rollout.reason || '–') + (rollout.updated ? ' (' + clock(rollout.updated) + ')' : ''));
    setText(parts.onBreach, rollout.on_breach);

    syncKeyed(
      parts.gates,
      rollout.gates || [],
      function (g) {
        return g.name;
      },
      function () {
        var li = el('li');
        li.appendChild(el('span', { className: 'badge' }));
        li.appendChild(el('span', null, el('span', { className: 'gate-name' }), ' ', el('span', { className: 'why' })));
        return li;
      },
      function (li, g) {
        setBadge(li.children[0], g.passed ? 'pass' : 'fail', g.passed ? 'pass' : 'fail');
        setText(li.querySelector('.gate-name'), g.name);
        setText(li.querySelector('.why'), g.reason);
        li.setAttribute('data-testid', 'gate-' + id + '-' + slug(g.name));
      }
    );
    if (!(rollout.gates || []).length && !parts.gates.children.length) {
      parts.gates.setAttribute('aria-label', parts.route + ' health gates: none configured');
    }

    var s = rollout.status;
    var allowed = {
      pause: s === 'progressing',
      resume: s === 'paused',
      promote: s !== 'promoted',
      rollback: s !== 'rolled_back',
      retry: s === 'rolled_back' || s === 'promoted' || s === 'paused',
    };
    Object.keys(parts.buttons).forEach(function (action) {
      var button = parts.buttons[action];
      if (button.disabled === allowed[action]) button.disabled = !allowed[action];
    });
  }

  function renderRoutes(snap) {
    var routes = (snap.signals && snap.signals.routes) || {};
    var rollouts = {};
    (snap.rollouts || []).forEach(function (r) {
      rollouts[r.route] = r;
    });
    var names = Object.keys(routes);
    $('routes-empty').hidden = names.length > 0;
    if (!names.length) setText($('routes-empty'), 'No routes configured.');
    Object.keys(state.cards).forEach(function (route) {
      if (names.indexOf(route) < 0) dropCard(route);
    });
    var clients = (snap.signals.saturation || {}).client_connections;
    names.forEach(function (route, index) {
      var info = routes[route];
      var variants = VARIANTS.filter(function (v) {
        return info.variants[v];
      });
      var rollout = rollouts[route];
      var parts = ensureCard(route, variants, !!rollout, index);
      if (rollout) {
        renderRollout(parts, rollout, snap);
      } else {
        setBadge(parts.status, 'no rollout', 'off');
        setText(parts.plain, 'a plain route to ' + info.variants.stable.upstream);
      }
      variants.forEach(function (variant) {
        var v = info.variants[variant];
        var one = v['1m'];
        var cells = parts.cells[variant];
        setText(cells.rps.main, fmtRate(one.rps) + ' req/s');
        setText(cells.rps.sub, one.requests + ' requests · ' + v.upstream);
        setText(cells.errors.main, fmtPct(one.error_rate));
        setText(cells.errors.sub, one.errors + ' failed');
        setText(cells.latency.main, fmtMs(one.latency_ms.p50) + ' / ' + fmtMs(one.latency_ms.p99));
        setText(cells.latency.sub, 'p95 ' + fmtMs(one.latency_ms.p95));
        setText(cells.saturation.main, v.saturation.in_flight + ' in flight');
        var use = poolUse(snap, v.upstream);
        setText(cells.saturation.sub, use ? 'pool ' + use.used + ' / ' + use.limit : '');
      });
      setText(parts.connections, 'Client connections (all routes): ' + (clients === undefined ? '–' : clients));
    });
  }

  /* ---------- the other cards ---------- */

  function overrideText(o) {
    if (!o) return '';
    var text = 'set by ' + o.actor + (o.reason ? ': ' + o.reason : '');
    if (o.expires) text += ' · expires ' + clock(o.expires) + ' (in ' + fmtDuration(o.expires - Date.now() / 1000) + ')';
    return text;
  }

  function renderFlags(snap) {
    var flags = snap.flags || {};
    var safe = flags.safe_mode || {};
    var safeNode = $('safe-mode');
    safeNode.textContent = '';
    safeNode.appendChild(el('span', { className: 'badge ' + (safe.enabled ? 'on' : 'off'), text: safe.enabled ? 'on' : 'off' }));
    if (safe.override) safeNode.appendChild(el('span', { className: 'sub', text: overrideText(safe.override) }));
    $('safe-on').disabled = !!safe.enabled;
    $('safe-off').disabled = !safe.enabled;

    var b = flags.brownout || {};
    var level = b.effective_level === undefined ? b.level : b.effective_level;
    var bNode = $('brownout');
    bNode.textContent = '';
    bNode.appendChild(el('span', { className: 'badge ' + (level ? 'level' + level : 'off'), text: 'level ' + level }));
    var detail = [];
    if (b.cause) detail.push('cause: ' + b.cause);
    detail.push('operator ' + b.level + ', automatic ' + (b.automatic_level || 0));
    if (b.override) detail.push(overrideText(b.override));
    bNode.appendChild(el('span', { className: 'sub', text: detail.join(' · ') }));

    var list = $('quarantines');
    var items = flags.quarantine || [];
    syncKeyed(
      list,
      items.length ? items : [{ none: true, target: '' }],
      function (q) {
        return q.none ? '(none)' : q.target;
      },
      function (q) {
        if (q.none) return el('li', { className: 'muted', text: 'Nothing is quarantined.' });
        var button = el('button', {
          type: 'button',
          className: 'small',
          'data-action': 'release',
          'data-target': q.target,
          'aria-label': 'Release ' + q.target,
          text: 'Release',
        });
        return el('li', null, el('span', { className: 'what' }, el('strong', { text: q.target }), el('span', { className: 'sub' })), button);
      },
      function (li, q) {
        if (q.none) return;
        var text = q.override ? overrideText(q.override) : q.from_config ? 'from the config file' : '';
        if (q.override && !q.override.expires) text += ' · no expiry';
        setText(li.querySelector('.sub'), text);
      }
    );
  }

  function quarantineTarget(snap, upstream, url) {
    var targets = ((snap.flags || {}).quarantine || []).map(function (q) {
      return q.target;
    });
    var own = upstream + '/' + url;
    if (targets.indexOf(own) >= 0) return own;
    if (targets.indexOf(upstream) >= 0) return upstream;
    return null;
  }

  function renderEndpoints(snap) {
    var rows = [];
    var pools = (snap.signals.saturation || {}).upstream_pools || {};
    Object.keys(snap.upstreams || {}).forEach(function (upstream) {
      snap.upstreams[upstream].forEach(function (e) {
        rows.push({ upstream: upstream, e: e, limit: (pools[upstream] || {}).limit_per_endpoint });
      });
    });
    syncKeyed(
      $('endpoints'),
      rows,
      function (r) {
        return r.upstream + '/' + r.e.endpoint;
      },
      function (r) {
        var tr = el('tr');
        tr.appendChild(el('th', { scope: 'row', className: 'endpoint' }, el('span', { text: r.upstream }), el('span', { className: 'sub', text: r.e.endpoint })));
        tr.appendChild(el('td', null, el('span', { className: 'badge' }), el('span', { className: 'sub' })));
        tr.appendChild(el('td', null, el('span', { className: 'badge' }), el('span', { className: 'sub' })));
        tr.appendChild(el('td'));
        tr.appendChild(el('td', null, el('button', { type: 'button', className: 'small' })));
        tr.setAttribute('data-testid', 'endpoint-' + slug(r.upstream + '/' + r.e.endpoint));
        return tr;
      },
      function (tr, r) {
        var e = r.e;
        var cells = tr.children;
        setBadge(cells[1].children[0], e.breaker, e.breaker);
        setText(cells[1].children[1], e.breaker === 'open' ? 'half-opens in ' + fmtDuration(e.open_for) : '');
        if (e.quarantined) setBadge(cells[2].children[0], 'quarantined', 'quarantined');
        else setBadge(cells[2].children[0], e.healthy ? 'healthy' : 'unhealthy', e.healthy ? 'healthy' : 'unhealthy');
        setText(cells[2].children[1], e.healthy ? (e.quarantined ? 'health checks pass' : '') : 'unhealthy: ' + (e.health_error || 'failing checks'));
        setText(cells[3], e.in_flight + (r.limit ? ' / ' + r.limit : ''));
        var button = cells[4].children[0];
        var target = quarantineTarget(snap, r.upstream, e.endpoint);
        var action = target ? 'release' : 'quarantine';
        target = target || r.upstream + '/' + e.endpoint;
        if (button.dataset.action !== action || button.dataset.target !== target) {
          button.dataset.action = action;
          button.dataset.target = target;
          button.textContent = action === 'release' ? 'Release' : 'Quarantine';
          button.setAttribute('aria-label', (action === 'release' ? 'Release ' : 'Quarantine ') + target);
        }
      }
    );
  }

  function renderSaturation(snap) {
    var sat = snap.signals.saturation || {};
    setText($('client-connections'), sat.client_connections === undefined ? '–' : sat.client_connections);
    setText($('requests-in-flight'), sat.requests_in_flight === undefined ? '–' : sat.requests_in_flight);
    var lag = (snap.watchdogs || {}).event_loop_lag_ms || {};
    setText($('loop-lag'), fmtMs(lag.last) + ' (worst last minute ' + fmtMs(lag.worst_last_minute) + ')');
    setText($('parser'), snap.parser || '–');
    var pools = sat.upstream_pools || {};
    syncKeyed(
      $('pools'),
      Object.keys(pools),
      function (name) {
        return name;
      },
      function () {
        return el('li', null, el('span', { className: 'what' }), el('span'));
      },
      function (li, name) {
        var use = poolUse(snap, name);
        setText(li.children[0], name);
        setText(li.children[1], use.used + ' / ' + use.limit + ' connections in use');
      }
    );
  }

  function renderWatchdogs(snap) {
    var w = snap.watchdogs || {};
    var events = w.events || {};
    setText($('events-published'), events.published === undefined ? '–' : events.published);
    setText($('events-failures'), events.publish_failures === undefined ? '–' : events.publish_failures);
    var sinks = w.sinks || {};
    var names = Object.keys(sinks);
    syncKeyed(
      $('sinks'),
      names.length ? names : [''],
      function (name) {
        return name || '(none)';
      },
      function (name) {
        if (!name) return el('tr', null, el('td', { colspan: '5', className: 'muted', text: 'No webhook sinks configured.' }));
        return el('tr', { 'data-testid': 'sink-' + slug(name) }, el('th', { scope: 'row', text: name }), el('td'), el('td'), el('td'), el('td', null, el('span', { className: 'badge' })));
      },
      function (tr, name) {
        if (!name) return;
        var s = sinks[name];
        setText(tr.children[1], s.outbox_depth);
        setText(tr.children[2], s.outbox_depth ? fmtDuration(s.oldest_age_seconds) : '–');
        setText(tr.children[3], s.dlq_depth);
        tr.children[3].className = s.dlq_depth ? 'error' : '';
        setBadge(tr.children[4].children[0], s.breaker, s.breaker);
      }
    );
  }

  function decisionKey(d) {
    return d.id || [d.type, d.time, d.flag || '', d.target || '', d.action].join('|');
  }

  function describeDecision(d) {
    var parts = [];
    if (d.type === 'flag') {
      parts.push(d.flag.replace('_', ' ') + (d.target ? ' ' + d.target : ''));
      parts.push(JSON.stringify(d.before) + ' → ' + JSON.stringify(d.after));
    } else {
      if (d.route) parts.push(d.route);
      if (d.status_before !== undefined && d.status_before !== d.status_after) parts.push(d.status_before + ' → ' + d.status_after);
      if (d.weight_before !== undefined && d.weight_before !== d.weight_after) parts.push(num(d.weight_before) + '% → ' + num(d.weight_after) + '%');
    }
    if (d.actor) parts.push('by ' + d.actor);
    var text = parts.join(' · ');
    if (d.reason) text += ' — ' + d.reason;
    if (d.expires) text += ' (until ' + clock(d.expires) + ')';
    return text;
  }

  function renderDecisions(snap) {
    var decisions = snap.decisions || [];
    var list = $('decisions');
    var key = decisions.map(decisionKey).join(',');
    if (list.dataset.key === key) return;
    list.dataset.key = key;
    list.textContent = '';
    if (!decisions.length) {
      list.appendChild(el('li', { className: 'muted', text: 'No decisions yet.' }));
      return;
    }
    decisions.forEach(function (d) {
      list.appendChild(
        el(
          'li',
          null,
          el('time', { datetime: isoTime(d.time), text: clock(d.time) }),
          el('span', { className: 'act', text: d.action }),
          el('span', { className: 'why', text: describeDecision(d) })
        )
      );
    });
  }

  function render(snap) {
    setText($('updated'), clock(snap.time));
    setText($('config-hash'), snap.config_hash || '–');
    setText($('config-age'), fmtDuration(snap.config_age_seconds));
    renderRoutes(snap);
    renderFlags(snap);
    renderEndpoints(snap);
    renderSaturation(snap);
    renderWatchdogs(snap);
    renderDecisions(snap);
    state.renders++;
  }

  /* ---------- the feed: stream, polling, staleness ---------- */

  function setFeed(text) {
    state.feed = text;
    setText($('feed'), text);
  }

  function receive(snap) {
    state.snapshot = snap;
    state.lastFresh = Date.now();
    state.unreachable = false;
    try {
      render(snap);
    } catch (err) {
      // One odd field must not freeze the page; the console says what.
      console.error('render failed', err);
    }
    if (appendPoint(snap.history_point)) refreshCharts();
    updateBanner();
  }

  function updateBanner() {
    var banner = $('banner');
    var now = Date.now();
    var text = '';
    var cls = 'banner';
    var since = state.lastFresh ? ' Last data: ' + clock(state.lastFresh / 1000) + '.' : '';
    if (state.unreachable) {
      text = 'Cannot reach the proxy’s admin server (' + state.unreachableError + '). Retrying every ' + POLL_MS / 1000 + ' s.' + since;
    } else if (state.lastFresh && now - state.lastFresh > STALE_MS) {
      text = 'Stale data: nothing new from the proxy for ' + fmtDuration((now - state.lastFresh) / 1000) + '.' + since;
      cls = 'banner stale';
    } else if (!state.lastFresh && now - state.started > STALE_MS) {
      text = 'No data from the proxy yet.';
      cls = 'banner stale';
    }
    if (text) {
      setText(banner, text);
      if (banner.className !== cls) banner.className = cls;
      banner.hidden = false;
    } else if (!banner.hidden) {
      banner.hidden = true;
      banner.textContent = '';
    }
  }

  function connectStream() {
    if (typeof window.EventSource !== 'function') {
      startPolling();
      return;
    }
    state.streamTried = Date.now();
    var source = new EventSource(STREAM_URL);
    state.source = source;
    source.addEventListener('snapshot', function (event) {
      if (state.source !== source) return;
      stopPolling();
      setFeed('live');
      var snap;
      try {
        snap = JSON.parse(event.data);
      } catch (err) {
        console.error('bad snapshot event', err);
        return;
      }
      receive(snap);
    });
    source.onerror = function () {
      if (state.source !== source) return;
      source.close();
      state.source = null;
      startPolling();
    };
  }

  function startPolling() {
    if (state.pollTimer) return;
    setFeed('polling every ' + POLL_MS / 1000 + ' s');
    state.pollTimer = setInterval(poll, POLL_MS);
    poll();
  }

  function stopPolling() {
    if (state.pollTimer) clearInterval(state.pollTimer);
    state.pollTimer = null;
  }

  function poll() {
    return fetch(SNAPSHOT_URL, { cache: 'no-store', headers: { Accept: 'application/json' } })
      .then(function (response) {
        if (!response.ok) throw new Error('HTTP ' + response.status);
        return response.json();
      })
      .then(function (snap) {
        if (state.pollTimer) setFeed('polling every ' + POLL_MS / 1000 + ' s');
        receive(snap);
        if (!state.source && Date.now() - state.streamTried > STREAM_RETRY_MS) connectStream();
      })
      .catch(function (err) {
        state.unreachable = true;
        state.unreachableError = err && err.message ? err.message : 'network error';
        setFeed('offline');
        updateBanner();
      });
  }

  function seedHistory() {
    return fetch(HISTORY_URL, { cache: 'no-store' })
      .then(function (response) {
        if (!response.ok) throw new Error('HTTP ' + response.status);
        return response.json();
      })
      .then(function (body) {
        (body.points || []).forEach(appendPoint);
      })
      .catch(function (err) {
        console.warn('no history', err);
      });
  }

  /* ---------- actions ---------- */

  function rolloutAction(verb, title, text) {
    return {
      title: function (req) {
        return title + ' ' + req.route + '?';
      },
      text: function (req) {
        return text.replace('{route}', req.route);
      },
      url: function (req) {
        return '/api/rollouts/' + encodeURIComponent(req.route) + '/' + verb;
      },
      body: function () {
        return {};
      },
      done: function (req, answer) {
        var r = answer.rollout || {};
        return req.route + ': ' + verb + ' done; now ' + (r.status || '?').replace('_', ' ') + ' at ' + num(r.weight) + '%.';
      },
    };
  }

  function flagsDone(answer) {
    var f = answer.flags || {};
    var safe = f.safe_mode || {};
    var b = f.brownout || {};
    return 'Flags now: safe mode ' + (safe.enabled ? 'on' : 'off') + ', brownout level ' + b.effective_level + ', ' + (f.quarantine || []).length + ' quarantined.';
  }

  var ACTIONS = {
    pause: rolloutAction('pause', 'Pause', 'Freeze the weight of {route}; no automatic steps (the analysis can still roll back).'),
    resume: rolloutAction('resume', 'Resume', 'Resume the steps of {route}; the current step’s hold starts again.'),
    promote: rolloutAction('promote', 'Promote', 'Send all of {route}’s traffic to the canary.'),
    rollback: rolloutAction('rollback', 'Roll back', 'Send all of {route}’s traffic back to the stable; the canary gets 0%.'),
    retry: rolloutAction('retry', 'Retry', 'Start the rollout of {route} again from the first step.'),
    'safe-on': {
      title: function () {
        return 'Turn safe mode on?';
      },
      text: function () {
        return 'Every route sends all traffic to its stable until safe mode is turned off or expires.';
      },
      ttl: true,
      url: function () {
        return '/api/flags/safe-mode';
      },
      body: function () {
        return { enabled: true };
      },
      done: function (req, answer) {
        return 'Safe mode on. ' + flagsDone(answer);
      },
    },
    'safe-off': {
      title: function () {
        return 'Turn safe mode off?';
      },
      text: function () {
        return 'Canaries get their weights again.';
      },
      url: function () {
        return '/api/flags/safe-mode';
      },
      body: function () {
        return { enabled: false };
      },
      done: function (req, answer) {
        return 'Safe mode off. ' + flagsDone(answer);
      },
    },
    brownout: {
      title: function () {
        return 'Set the brownout level';
      },
      text: function () {
        return 'Level 1 sheds sheddable traffic, level 2 also default traffic; 0 turns the operator’s brownout off.';
      },
      level: true,
      ttl: true,
      url: function () {
        return '/api/flags/brownout';
      },
      body: function (req, form) {
        return { level: form.level };
      },
      done: function (req, answer) {
        return 'Brownout set. ' + flagsDone(answer);
      },
    },
    quarantine: {
      title: function (req) {
        return 'Quarantine ' + req.target + '?';
      },
      text: function () {
        return 'Take it out of rotation: no traffic goes to it until it is released or the quarantine expires.';
      },
      ttl: true,
      url: function () {
        return '/api/flags/quarantine';
      },
      body: function (req) {
        return { target: req.target };
      },
      done: function (req, answer) {
        return req.target + ' quarantined. ' + flagsDone(answer);
      },
    },
    release: {
      title: function (req) {
        return 'Release ' + req.target + '?';
      },
      text: function () {
        return 'Put it back into rotation.';
      },
      url: function () {
        return '/api/flags/release';
      },
      body: function (req) {
        return { target: req.target };
      },
      done: function (req, answer) {
        return req.target + ' released. ' + flagsDone(answer);
      },
    },
  };

  var pending = null;
  var toastTimer = null;

  function storedToken() {
    try {
      return window.sessionStorage.getItem(TOKEN_KEY);
    } catch (err) {
      return null;
    }
  }

  function storeToken(token) {
    try {
      if (token === null) window.sessionStorage.removeItem(TOKEN_KEY);
      else window.sessionStorage.setItem(TOKEN_KEY, token);
    } catch (err) {
      /* storage disabled: the token is asked for every time */
    }
  }

  function openDialog(req, error) {
    var spec = ACTIONS[req.action];
    if (!spec) return;
    pending = req;
    var dialog = $('confirm');
    setText($('confirm-title'), spec.title(req));
    setText($('confirm-text'), spec.text(req));
    var errorNode = $('confirm-error');
    errorNode.hidden = !error;
    setText(errorNode, error || '');
    $('level-field').hidden = !spec.level;
    $('ttl-field').hidden = !spec.ttl;
    var needToken = storedToken() === null;
    $('token-field').hidden = !needToken;
    $('confirm-token').value = '';
    $('confirm-reason').value = req.reason || '';
    $('confirm-ttl').value = req.ttl || '';
    if (spec.level) {
      var current = state.snapshot && state.snapshot.flags ? state.snapshot.flags.brownout.level : 0;
      $('confirm-level').value = String(req.level !== undefined ? req.level : current ? 0 : 1);
    }
    var ok = $('confirm-ok');
    ok.textContent = req.action === 'rollback' ? 'Roll back' : 'Confirm';
    if (!dialog.open) dialog.showModal();
    (needToken && error ? $('confirm-token') : spec.level ? $('confirm-level') : $('confirm-reason')).focus();
  }

  function closeDialog() {
    var dialog = $('confirm');
    if (dialog.open) dialog.close();
  }

  function toast(text, failed) {
    var node = $('toast');
    setText(node, text);
    node.className = failed ? 'toast failed' : 'toast';
    node.hidden = false;
    if (toastTimer) clearTimeout(toastTimer);
    toastTimer = setTimeout(function () {
      node.hidden = true;
    }, failed ? 15000 : 8000);
  }

  function refreshNow() {
    return fetch(SNAPSHOT_URL, { cache: 'no-store' })
      .then(function (response) {
        return response.ok ? response.json() : null;
      })
      .then(function (snap) {
        if (snap) receive(snap);
      })
      .catch(function () {
        /* the feed reports it */
      });
  }

  function run(req) {
    var spec = ACTIONS[req.action];
    var body = spec.body(req, { level: Number(req.level) });
    if (req.reason) body.reason = req.reason;
    if (spec.ttl && req.ttl) body.ttl = req.ttl;
    var headers = { 'Content-Type': 'application/json', Accept: 'application/json', 'X-Shaper-Actor': 'dashboard' };
    var token = storedToken();
    if (token) headers.Authorization = 'Bearer ' + token;
    return fetch(spec.url(req), { method: 'POST', headers: headers, body: JSON.stringify(body), cache: 'no-store' })
      .then(function (response) {
        return response
          .json()
          .catch(function () {
            return {};
          })
          .then(function (answer) {
            if (response.status === 401) {
              storeToken(null);
              openDialog(req, 'The admin token was refused (401). Enter it again.');
              return;
            }
            if (!response.ok) {
              toast('Failed: ' + (answer.detail || answer.error || 'HTTP ' + response.status) + ' (HTTP ' + response.status + ')', true);
              return;
            }
            toast(spec.done(req, answer), false);
            return refreshNow();
          });
      })
      .catch(function (err) {
        toast('Failed: cannot reach the admin server (' + (err && err.message ? err.message : 'network error') + ')', true);
      });
  }

  function onSubmit(event) {
    event.preventDefault();
    if (!pending) return;
    var req = Object.assign({}, pending);
    var spec = ACTIONS[req.action];
    req.reason = $('confirm-reason').value.trim();
    req.ttl = $('confirm-ttl').value.trim();
    if (spec.level) req.level = Number($('confirm-level').value);
    if (spec.level && req.level > 0 && !req.reason) {
      var errorNode = $('confirm-error');
      setText(errorNode, 'A brownout needs a reason.');
      errorNode.hidden = false;
      $('confirm-reason').focus();
      return;
    }
    if (!$('token-field').hidden) storeToken($('confirm-token').value);
    pending = null;
    closeDialog();
    run(req);
  }

  var opener = null;

  function init() {
    document.addEventListener('click', function (event) {
      var button = event.target.closest('button[data-action]');
      if (!button || button.disabled) return;
      opener = button;
      openDialog({ action: button.dataset.action, route: button.dataset.route, target: button.dataset.target });
    });
    $('confirm-form').addEventListener('submit', onSubmit);
    $('confirm-cancel').addEventListener('click', function () {
      pending = null;
      closeDialog();
    });
    $('confirm').addEventListener('close', function () {
      if (opener && document.contains(opener) && !$('confirm').open) opener.focus();
    });
    setInterval(updateBanner, 1000);
    seedHistory().then(function () {
      refreshCharts();
      connectStream();
    });
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
