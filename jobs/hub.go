package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/redisconn"
)

// Hub fans the live events of jobs out to this process's subscribers over a
// single Redis Pub/Sub connection (not one connection per client). A channel
// is subscribed while at least one local subscriber follows that job.
//
// The event log (a Redis Stream per job) is the truth; Pub/Sub only carries
// events fast. A subscriber that falls behind, or any subscriber when the
// Pub/Sub connection was lost, is told to resync from the log, so nothing is
// lost and nothing is delivered twice (Follow dedupes by event id).
type Hub struct {
	store *Store
	log   *slog.Logger
	ps    *redis.PubSub
	// failing reports a run of receive failures once (go-redis reconnects
	// and resubscribes on the next Receive; events published meanwhile are
	// in the log: every subscriber resyncs).
	failing *redisconn.Reporter

	mu        sync.Mutex
	subs      map[string][]*Subscription // job id → subscribers (almost always one)
	confirmed map[string]chan struct{}   // channel → closed once SUBSCRIBE is confirmed
	notify    map[string]func()          // channel → called for each message (Notify)
	closed    bool
	done      chan struct{}
}

// Subscription receives one job's live events.
//
// Its follower waits on the events channel alone (one channel, not a select
// over several: the cheapest wake-up per event when thousands of streams
// each get one): anything else it must see (events were dropped, a
// heartbeat is due, its context ended) sets a flag and wakes it with a zero
// Event, unless the buffer is full, in which case it wakes anyway.
type Subscription struct {
	hub    *Hub
	job    string
	events chan Event  // live events; a zero Event only wakes the follower
	resync atomic.Bool // events were dropped: re-read the log
	idle   atomic.Bool // a heartbeat is due
	closed bool        // events is closed (under hub.mu)
	once   sync.Once
}

const (
	subscriptionBuffer = 32
	pingEvery          = 30 * time.Second
)

// NewHub starts the hub's receive loop; Close stops it.
func NewHub(store *Store, log *slog.Logger) *Hub {
	h := &Hub{
		store:     store,
		log:       log,
		subs:      map[string][]*Subscription{},
		confirmed: map[string]chan struct{}{},
		notify:    map[string]func(){},
		done:      make(chan struct{}),
		failing:   redisconn.NewReporter(log, "event hub: receiving published events"),
	}
	// Subscribe to a channel nobody publishes on so the connection exists and
	// Receive has something to wait on.
	h.ps = store.rdb.Subscribe(context.Background(), ChannelPrefix+"_hub")
	go h.loop()
	return h
}

// Close ends the hub; every subscription's channel is closed.
func (h *Hub) Close() error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return nil
	}
	h.closed = true
	h.mu.Unlock()
	err := h.ps.Close()
	<-h.done
	h.mu.Lock()
	for _, set := range h.subs {
		for _, s := range set {
			s.closeLocked()
		}
	}
	h.subs = map[string][]*Subscription{}
	h.mu.Unlock()
	return err
}

func (h *Hub) loop() {
	defer close(h.done)
	ctx := context.Background()
	for {
		msg, err := h.ps.ReceiveTimeout(ctx, pingEvery)
		if err == nil {
			h.failing.OK()
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				_ = h.ps.Ping(ctx) // keep the connection checked; the reply arrives as a Pong
				continue
			}
			h.mu.Lock()
			closed := h.closed
			h.mu.Unlock()
			if closed || errors.Is(err, redis.ErrClosed) {
				return
			}
			// go-redis reconnects and resubscribes on the next Receive; events
			// published meanwhile are in the log: every subscriber resyncs.
			h.failing.Fail(err)
			h.resyncAll()
			select {
			case <-time.After(100 * time.Millisecond):
			case <-h.done:
			}
			continue
		}
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" {
				h.mu.Lock()
				if c, ok := h.confirmed[m.Channel]; ok {
					select {
					case <-c:
					default:
						close(c)
					}
				}
				h.mu.Unlock()
			}
		case *redis.Message:
			h.mu.Lock()
			fn := h.notify[m.Channel]
			h.mu.Unlock()
			if fn != nil {
				fn()
				continue
			}
			h.dispatch(m)
		}
	}
}

func (h *Hub) dispatch(m *redis.Message) {
	id := strings.TrimPrefix(m.Channel, ChannelPrefix)
	var ev Event
	if err := json.Unmarshal([]byte(m.Payload), &ev); err != nil {
		h.log.Error("event hub: bad event payload", "job_id", id, "err", err)
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, s := range h.subs[id] {
		select {
		case s.events <- ev:
		default:
			s.signalResyncLocked()
		}
	}
}

func (h *Hub) resyncAll() {
	h.mu.Lock()
	fns := make([]func(), 0, len(h.notify))
	for _, fn := range h.notify {
		fns = append(fns, fn)
	}
	h.mu.Unlock()
	for _, fn := range fns {
		fn() // messages may have been missed
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, set := range h.subs {
		for _, s := range set {
			s.signalResyncLocked()
		}
	}
}

// Push delivers an event that is not logged (a job's new place in line) to
// this process's subscribers of job id. Follow gives it an id after the last
// event the subscriber got (see ValidEventID). A subscriber too far behind
// to take it misses it: it is only ever the latest of its kind.
func (h *Hub) Push(id, name string, data json.RawMessage) {
	ev := Event{Name: name, Data: data}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, s := range h.subs[id] {
		select {
		case s.events <- ev:
		default:
		}
	}
}

// Notify calls fn for every message published on channel, over the hub's
// one connection, until the hub closes. fn runs on the hub's receive loop:
// it must not block. After a lost connection fn is called once too, since
// messages may have been missed.
func (h *Hub) Notify(ctx context.Context, channel string, fn func()) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return errors.New("event hub closed")
	}
	if _, ok := h.notify[channel]; ok {
		return fmt.Errorf("event hub: %s already has a listener", channel)
	}
	h.notify[channel] = fn
	return h.ps.Subscribe(ctx, channel)
}

// Subscribe follows job id's live events. It returns once Redis has confirmed
// the subscription, so an event logged after Subscribe returns is delivered
// live (an earlier one is in the log).
func (h *Hub) Subscribe(ctx context.Context, id string) (*Subscription, error) {
	s := &Subscription{hub: h, job: id, events: make(chan Event, subscriptionBuffer)}
	ch := channel(id)
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return nil, errors.New("event hub closed")
	}
	h.subs[id] = append(h.subs[id], s)
	conf, ok := h.confirmed[ch]
	first := !ok
	if first {
		conf = make(chan struct{})
		h.confirmed[ch] = conf
	}
	var err error
	if first {
		// Under h.mu so that SUBSCRIBE and UNSUBSCRIBE of one channel reach
		// Redis in the order the hub decided them. go-redis only writes here.
		err = h.ps.Subscribe(ctx, ch)
	}
	h.mu.Unlock()
	if err != nil {
		s.Close()
		return nil, err
	}
	select {
	case <-conf:
		return s, nil
	case <-ctx.Done():
		s.Close()
		return nil, ctx.Err()
	case <-time.After(5 * time.Second):
		// Confirmation lost (a reconnect in between): the subscriber will
		// still catch up from the log on resync.
		h.mu.Lock()
		s.signalResyncLocked()
		h.mu.Unlock()
		return s, nil
	}
}

// signalResyncLocked tells the follower that live events were dropped: it
// re-reads the log. The caller holds hub.mu.
func (s *Subscription) signalResyncLocked() {
	s.resync.Store(true)
	s.wakeLocked()
}

// wake wakes the follower up to look at its flags.
func (s *Subscription) wake() {
	s.hub.mu.Lock()
	s.wakeLocked()
	s.hub.mu.Unlock()
}

// wakeLocked: a full buffer wakes the follower anyway. The caller holds
// hub.mu, under which events is sent to and closed.
func (s *Subscription) wakeLocked() {
	if s.closed {
		return
	}
	select {
	case s.events <- Event{}:
	default:
	}
}

func (s *Subscription) closeLocked() {
	s.once.Do(func() {
		s.closed = true
		close(s.events)
	})
}

// Close stops the subscription (the Redis channel is unsubscribed when its
// last local subscriber leaves).
func (s *Subscription) Close() {
	h := s.hub
	h.mu.Lock()
	set := h.subs[s.job]
	if i := slices.Index(set, s); i >= 0 {
		set = slices.Delete(set, i, i+1)
		h.subs[s.job] = set
	}
	last := len(set) == 0
	if last {
		delete(h.subs, s.job)
		delete(h.confirmed, channel(s.job))
	}
	if last && !h.closed {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = h.ps.Unsubscribe(ctx, channel(s.job))
		cancel()
	}
	s.closeLocked()
	h.mu.Unlock()
}

// Follow calls fn with every event of job id after the event id after, in
// order and exactly once each: first what the log holds, then live ones,
// until fn returns stop, a terminal event was delivered, or ctx ends. The
// subscription must have been made before Follow reads the log.
//
// While nothing happens, idle is called every idleEvery (SSE heartbeats).
func (s *Subscription) Follow(ctx context.Context, after string, idleEvery time.Duration, idle func() error, fn func(Event) (stop bool, err error)) error {
	last := after
	beat := time.AfterFunc(idleEvery, func() {
		s.idle.Store(true)
		s.wake()
	})
	defer beat.Stop()
	defer context.AfterFunc(ctx, s.wake)()
	started := false // a logged event other than `queued` was delivered
	deliver := func(ev Event) (bool, error) {
		if ev.ID == "" { // pushed, not logged: a place in line
			if last == "" || started {
				return false, nil // read before the log, or the job left the line
			}
			ev.ID = nextPushedID(last) // after last by construction
		} else {
			if ev.Name != string(Queued) {
				started = true
			}
			if last != "" && compareEventIDs(ev.ID, last) <= 0 {
				return false, nil // already delivered (replay and live overlap)
			}
		}
		last = ev.ID
		stop, err := fn(ev)
		if err != nil || stop {
			return true, err
		}
		return ev.Terminal(), nil
	}
	catchUp := func() (bool, error) {
		for {
			evs, err := s.hub.store.Events(ctx, s.job, last, 1000)
			if err != nil {
				return true, err
			}
			for _, ev := range evs {
				if done, err := deliver(ev); done || err != nil {
					return true, err
				}
			}
			if len(evs) < 1000 {
				return false, nil
			}
		}
	}
	if done, err := catchUp(); done || err != nil {
		return err
	}
	for {
		ev, ok := <-s.events
		if !ok {
			return ErrHubClosed
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if s.resync.Swap(false) {
			// Drop this event and what is buffered (the log has them too)
			// and re-read.
			for drained := false; !drained; {
				select {
				case _, ok := <-s.events:
					if !ok {
						return ErrHubClosed
					}
				default:
					drained = true
				}
			}
			if done, err := catchUp(); done || err != nil {
				return err
			}
			ev = Event{}
		}
		if s.idle.Swap(false) {
			if err := idle(); err != nil {
				return err
			}
			beat.Reset(idleEvery)
		}
		if ev.ID == "" && ev.Name == "" {
			continue // only a wake-up
		}
		if done, err := deliver(ev); done || err != nil {
			return err
		}
	}
}

// ErrHubClosed ends a Follow when the process is shutting down.
var ErrHubClosed = errors.New("event hub closed")
