/*
 * The gift overlay: follows GET /gift/events (Server-Sent Events) and shows
 * each acknowledgement, per-device totals and the connection's state.
 *
 * Query parameters (all optional; see docs/overlay.md):
 *   transparent=1        no background, outlined text (OBS browser source)
 *   device=, room=, status=   passed through to the stream as filters
 *   src=/gift/events     the stream's URL (relative to this page)
 *   max=50               feed entries kept (1-500); older ones are removed
 *   since=SEQ            on the first connection, replay what follows SEQ
 *   view=feed|totals     show one panel only
 *
 * Viewers choose their own names: every value from the stream reaches the
 * page through textContent, never as markup.
 */
(function () {
    'use strict';

    var params = new URLSearchParams(location.search);
    var FILTERS = ['device', 'room', 'status'];
    var MAX = clampInt(params.get('max'), 1, 500, 50);
    var SEEN_MAX = 2048;             /* seqs remembered against replays */
    var GAP_NOTICE_MS = 30000;

    var el = {
        conn: byId('conn'), connText: byId('conn-text'), connId: byId('conn-id'),
        notice: byId('notice'), feed: byId('feed'), empty: byId('feed-empty'),
        totals: byId('totals-body'), tpl: byId('entry-tpl')
    };

    var state = {
        es: null,
        opened: false,          /* has any connection been live? */
        lastId: null,           /* the newest acknowledgement's seq */
        seen: new Set(),
        seenOrder: [],
        devices: new Map(),     /* deviceId -> { rounds, gifts, failed, row } */
        retryMs: 1000,
        retryTimer: 0,
        noticeTimer: 0
    };

    var root = document.documentElement;
    if (flag(params.get('transparent'))) {
        root.classList.add('transparent');
    }
    var view = params.get('view');
    if (view === 'feed' || view === 'totals') {
        root.classList.add('only-' + view);
    }

    var num = new Intl.NumberFormat();

    connect(params.get('since'));

    /* ------------------------------------------------------------ stream */

    function streamUrl(resumeFrom) {
        var u = new URL(params.get('src') || '/gift/events', location.href);
        FILTERS.forEach(function (k) {
            params.getAll(k).forEach(function (v) {
                if (v !== '') {
                    u.searchParams.append(k, v);
                }
            });
        });
        if (resumeFrom !== null && resumeFrom !== undefined
            && /^\d+$/.test(String(resumeFrom)))
        {
            u.searchParams.set('last_event_id', String(resumeFrom));
        }
        return u.href;
    }

    /*
     * EventSource reconnects by itself after a dropped stream, sending
     * Last-Event-ID, and the server replays what was missed.  It gives up
     * only when an answer is not a stream (a 503 when the server is full,
     * a 502 from a proxy): then a new EventSource, after a back-off, asks
     * for the rest with ?last_event_id=.
     */
    function connect(resumeFrom) {
        var es;

        clearTimeout(state.retryTimer);
        setConn(state.opened ? 'reconnecting' : 'connecting');

        try {
            es = new EventSource(streamUrl(resumeFrom));
        } catch (e) {
            setConn('error', 'bad stream URL');
            return;
        }
        state.es = es;

        es.onopen = function () {
            state.opened = true;
            state.retryMs = 1000;
            setConn('live');
        };

        es.onerror = function () {
            if (es !== state.es) {
                return;
            }
            if (es.readyState === EventSource.CLOSED) {
                es.close();
                setConn(state.opened ? 'reconnecting' : 'connecting');
                state.retryTimer = setTimeout(function () {
                    connect(state.lastId !== null ? state.lastId
                                                  : params.get('since'));
                }, state.retryMs);
                state.retryMs = Math.min(state.retryMs * 2, 30000);
            } else {
                setConn(state.opened ? 'reconnecting' : 'connecting');
            }
        };

        es.addEventListener('ack', function (ev) {
            var a = parse(ev.data);
            if (a) {
                onAck(a, ev.lastEventId);
            }
        });

        es.addEventListener('gap', function (ev) {
            var g = parse(ev.data);
            if (g) {
                onGap(g);
            }
        });
    }

    function parse(data) {
        try {
            var v = JSON.parse(data);
            return v && typeof v === 'object' ? v : null;
        } catch (e) {
            return null;
        }
    }

    /* ------------------------------------------------------------ events */

    function onAck(a, id) {
        var seq = a.seq !== undefined ? String(a.seq) : String(id || '');

        if (seq !== '' && state.seen.has(seq)) {
            return;                 /* replayed twice: shown once */
        }
        if (seq !== '') {
            state.seen.add(seq);
            state.seenOrder.push(seq);
            if (state.seenOrder.length > SEEN_MAX) {
                state.seen.delete(state.seenOrder.shift());
            }
            state.lastId = seq;
        }

        addEntry(a, seq);
        addToTotals(a);
        showLastId();
    }

    function onGap(g) {
        var from = toInt(g.from), to = toInt(g.to);
        var what = from === to ? '#' + from : '#' + from + '–#' + to;
        var n = to - from + 1;

        el.notice.textContent = 'Missed ' + num.format(n) + ' acknowledgement'
            + (n === 1 ? '' : 's') + ' (' + what + '): the server no longer'
            + ' keeps them. Totals leave them out.';
        el.notice.dataset.from = String(from);
        el.notice.dataset.to = String(to);
        el.notice.hidden = false;
        clearTimeout(state.noticeTimer);
        state.noticeTimer = setTimeout(function () {
            el.notice.hidden = true;
        }, GAP_NOTICE_MS);
    }

    /* ------------------------------------------------------------ view */

    function addEntry(a, seq) {
        var li = el.tpl.content.firstElementChild.cloneNode(true);
        var dead = a.status === 'dead_letter';
        var rounds = toInt(a.rounds);
        var qty = toInt(a.quantity);

        li.classList.add(dead ? 'dead' : 'ok');
        if (seq !== '') {
            li.dataset.seq = seq;
        }
        text(li, '.who', str(a.userName) || str(a.userId) || 'someone');
        text(li, '.gift', str(a.giftName) || 'a gift');
        text(li, '.qty', '×' + num.format(qty || 1));
        /* a gift above the per-gift limit turned only the limit: say so */
        text(li, '.rounds', num.format(rounds) + (rounds === 1 ? ' round'
                                                                : ' rounds')
             + (a.capped === true
                ? ' (capped, ' + num.format(toInt(a.roundsRequested))
                  + ' asked)'
                : ''));
        text(li, '.device', str(a.deviceId) || '?');
        /* "ok" from a motor means it accepted the command (the firmware
         * answers on acceptance, then turns) */
        text(li, '.status', dead ? 'dead letter: ' + (str(a.reason) || 'unknown')
                                 : 'accepted');
        li.querySelector('.status').title = dead
            ? 'not turned: dead-lettered' : 'accepted by the motor';
        text(li, '.latency', latency(a.latencyMs));

        var when = li.querySelector('.when');
        var ts = Number(a.ts);
        if (ts > 0) {
            var d = new Date(ts);
            when.dateTime = d.toISOString();
            when.textContent = d.toLocaleTimeString();
        }

        el.feed.insertBefore(li, el.feed.firstChild);
        while (el.feed.childElementCount > MAX) {
            el.feed.removeChild(el.feed.lastElementChild);
        }
        el.empty.hidden = true;
    }

    /* Rounds count what the motors turned (status ok); gifts count every
     * ok acknowledgement; failed counts dead letters. */
    function addToTotals(a) {
        var id = str(a.deviceId) || '?';
        var t = state.devices.get(id);

        if (!t) {
            t = { rounds: 0, gifts: 0, failed: 0, row: newRow(id) };
            state.devices.set(id, t);
        }
        if (a.status === 'dead_letter') {
            t.failed++;
        } else {
            t.gifts++;
            t.rounds += toInt(a.rounds);
        }
        var c = t.row.cells;
        c[1].textContent = num.format(t.rounds);
        c[2].textContent = num.format(t.gifts);
        c[3].textContent = num.format(t.failed);
        t.row.classList.toggle('has-failed', t.failed > 0);
    }

    function newRow(id) {
        var tr = document.createElement('tr');
        var th = document.createElement('th');
        th.scope = 'row';
        th.textContent = id;
        tr.appendChild(th);
        for (var i = 0; i < 3; i++) {
            tr.appendChild(document.createElement('td'));
        }
        tr.dataset.device = id;

        /* keep the rows sorted by device id */
        var rows = el.totals.rows, before = null;
        for (var j = 0; j < rows.length; j++) {
            if (rows[j].dataset.device > id) {
                before = rows[j];
                break;
            }
        }
        el.totals.insertBefore(tr, before);
        return tr;
    }

    function setConn(s, detail) {
        var label = { connecting: 'connecting…', live: 'live',
                      reconnecting: 'reconnecting…', error: 'error' }[s] || s;
        el.conn.dataset.state = s;
        el.connText.textContent = detail ? label + ': ' + detail : label;
        showLastId();
    }

    function showLastId() {
        el.connId.textContent = state.lastId !== null
            ? 'last id ' + state.lastId : '';
    }

    /* ------------------------------------------------------------ helpers */

    function byId(id) { return document.getElementById(id); }

    function text(parent, sel, s) { parent.querySelector(sel).textContent = s; }

    function str(v) {
        return typeof v === 'string' ? v
             : typeof v === 'number' ? String(v) : '';
    }

    function toInt(v) {
        var n = Number(v);
        return isFinite(n) && n > 0 ? Math.floor(n) : 0;
    }

    function clampInt(v, lo, hi, dflt) {
        var n = parseInt(v, 10);
        return isNaN(n) ? dflt : Math.max(lo, Math.min(hi, n));
    }

    function flag(v) {
        return v !== null && v !== '0' && v !== 'false' && v !== 'no';
    }

    function latency(ms) {
        var n = Number(ms);
        if (!isFinite(n) || n < 0 || ms === null || ms === undefined) {
            return '';
        }
        if (n >= 1000) {
            return (n / 1000).toFixed(n >= 10000 ? 0 : 1) + ' s';
        }
        return (n < 10 ? n.toFixed(1) : Math.round(n)) + ' ms';
    }
})();
