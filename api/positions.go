package api

import (
	"context"
	"encoding/json"
	"strconv"
	"sync"
	"time"

	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
)

// positionEvery is how often an api process reads the places in line of
// all the waiting jobs its clients follow, whatever happened. Between reads,
// a queue announcing that jobs left it (scheduler.MovedChannel: a dispatch,
// a cancel, an expiry, a retry coming back) starts a read of that group's
// followed jobs at once. A job read since the previous tick (its queue moved,
// or a push was due) is not read again on this tick: under a steady stream
// of dispatches the periodic read is mostly redundant, so each job is then
// read at least once every two ticks rather than every tick.
//
// A place that changed is pushed to this process's followers of the job as
// a `queued` event, at most once a second per job (scheduler.PushEvery).
// These events are not logged: a place in line is only worth its latest
// value, and writing one per waiting job per dispatch would cost Redis more
// than everything else sluice does. A client that reconnects gets the
// current place at once instead (see watch).
const positionEvery = time.Second

// readGap is the least time between two reads: under a steady stream of
// dispatches a process reads at most ten times a second, whatever the
// dispatch rate (each follower still gets a changed place within a second).
const readGap = 100 * time.Millisecond

// watchers are the waiting jobs this process's event streams follow.
type watchers struct {
	mu     sync.Mutex
	jobs   map[string]*watched
	kicked map[string]bool // groups whose queue moved since the last read
	kick   chan struct{}   // one pending signal: read the kicked groups
}

type watched struct {
	w      scheduler.Watched
	refs   int
	pos    int       // the place last pushed (or told at admission)
	down   bool      // the last push said the group was in outage
	at     time.Time // when it was pushed
	readAt time.Time // when its place was last read (a periodic read: that tick)
	resend bool      // push the current place even if unchanged (a new follower)
}

// watch adds a waiting job to the position reads until the returned func
// is called. A follower that replays the log from the start saw the place
// told at admission; one that resumes (after != "") is sent the current
// place at once, whether it changed or not.
func (s *Server) watch(j *jobs.Job, after string) (unwatch func()) {
	g, ok := s.group(j.Group)
	if !ok || j.FQMember == "" {
		return func() {}
	}
	s.watching.mu.Lock()
	e, ok := s.watching.jobs[j.ID]
	if !ok {
		pos, down := firstPosition(j)
		e = &watched{w: scheduler.Watched{ID: j.ID, Member: j.FQMember, Group: g}, pos: pos, down: down}
		s.watching.jobs[j.ID] = e
	}
	if ok || after != "" {
		e.resend = true
	}
	e.refs++
	resend := e.resend
	s.watching.mu.Unlock()
	if resend {
		s.moved(g.Name)
	}
	return func() {
		s.watching.mu.Lock()
		defer s.watching.mu.Unlock()
		if e.refs--; e.refs <= 0 && s.watching.jobs[j.ID] == e {
			delete(s.watching.jobs, j.ID)
		}
	}
}

// placeData is a pushed `queued` event's data:
// {"position":N,"eta_seconds":N}, in one allocation; while the job's model
// group is in outage (eta -1) {"position":N,"eta_seconds":null,"reason":
// "upstream_unavailable"}.
func placeData(p scheduler.Place) json.RawMessage {
	b := make([]byte, 0, 80)
	b = append(b, `{"position":`...)
	b = strconv.AppendInt(b, int64(p.Position), 10)
	if p.ETASeconds < 0 {
		b = append(b, `,"eta_seconds":null,"reason":"`+waitUpstream+`"`...)
		return append(b, '}')
	}
	b = append(b, `,"eta_seconds":`...)
	b = strconv.AppendInt(b, int64(p.ETASeconds), 10)
	return append(b, '}')
}

// firstPosition is the place the job's first event told, and whether it
// said the group was in outage.
func firstPosition(j *jobs.Job) (int, bool) {
	var d struct {
		Position int    `json:"position"`
		Reason   string `json:"reason"`
	}
	_ = json.Unmarshal([]byte(j.FirstEvent), &d)
	return d.Position, d.Reason != ""
}

// moved marks group's queue as changed (called on the hub's receive loop:
// never blocks).
func (s *Server) moved(group string) {
	s.watching.mu.Lock()
	s.watching.kicked[group] = true
	s.watching.mu.Unlock()
	select {
	case s.watching.kick <- struct{}{}:
	default:
	}
}

// listenMoved asks the event hub for every group's "moved" announcements.
func (s *Server) listenMoved() {
	if s.d.Hub == nil {
		return
	}
	for i := range s.cfg.ModelGroups {
		name := s.cfg.ModelGroups[i].Name
		if err := s.d.Hub.Notify(s.stop, scheduler.MovedChannel(name), func() { s.moved(name) }); err != nil {
			s.log.Warn("positions: cannot follow queue moves; positions update once a second", "group", name, "err", err)
		}
	}
}

// pushPositions runs until the server stops: on every tick for the
// followed waiting jobs not read since the previous tick, and at once for a
// group whose queue moved, one pipelined round trip reads their places, and
// each changed place is pushed to the job's followers here. A job that moved
// too soon after its last push is read again when it may be pushed.
func (s *Server) pushPositions() {
	every := positionEvery
	if s.d.PositionEvery > 0 {
		every = s.d.PositionEvery
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	later := time.NewTimer(time.Hour)
	later.Stop()
	defer later.Stop()
	var laterAt time.Time  // when later fires; zero = not set
	var lastTick time.Time // when the previous tick's read began
	type push struct {
		id   string
		data json.RawMessage
	}
	// Reused from read to read (10,000 followed jobs: half a megabyte each).
	var es []*watched
	var ws []scheduler.Watched
	var pushes []push
	for {
		all, periodic := false, false
		select {
		case <-s.stop.Done():
			return
		case <-tick.C:
			periodic = true
		case <-later.C:
			all, laterAt = true, time.Time{}
		case <-s.watching.kick:
		}
		// A periodic read skips the jobs read since the previous tick; the
		// jobs it reads are stamped with the tick's own time, so that the
		// next tick reads them again.
		stamp, since := time.Now(), lastTick
		if periodic {
			lastTick = stamp
		}
		s.watching.mu.Lock()
		kicked := s.watching.kicked
		es, ws = es[:0], ws[:0]
		for _, e := range s.watching.jobs {
			if all || kicked[e.w.Group.Name] || periodic && !e.readAt.After(since) {
				es = append(es, e)
				ws = append(ws, e.w)
			}
		}
		clear(kicked)
		s.watching.mu.Unlock()
		if len(ws) == 0 {
			continue
		}
		readAt := time.Now()
		ctx, cancel := context.WithTimeout(s.stop, positionEvery)
		places, err := s.d.Scheduler.Places(ctx, ws)
		cancel()
		if err != nil {
			if s.stop.Err() == nil {
				s.log.Warn("could not read positions", "err", err)
			}
			continue
		}
		now := time.Now()
		var retryIn time.Duration
		pushes = pushes[:0]
		s.watching.mu.Lock()
		for i, e := range es {
			e.readAt = stamp
			p := places[i]
			switch {
			case p.Position == 0:
				if s.watching.jobs[e.w.ID] == e {
					delete(s.watching.jobs, e.w.ID) // left the queue: nothing more to push
				}
			case p.Position == e.pos && (p.ETASeconds < 0) == e.down && !e.resend:
			case now.Sub(e.at) < scheduler.PushEvery && !e.resend:
				if d := scheduler.PushEvery - now.Sub(e.at); retryIn == 0 || d < retryIn {
					retryIn = d
				}
			default:
				e.pos, e.at, e.resend, e.down = p.Position, now, false, p.ETASeconds < 0
				pushes = append(pushes, push{e.w.ID, placeData(p)})
			}
		}
		s.watching.mu.Unlock()
		for _, p := range pushes {
			s.d.Hub.Push(p.id, string(jobs.Queued), p.data)
		}
		if at := now.Add(retryIn); retryIn > 0 && (laterAt.IsZero() || at.Before(laterAt)) {
			later.Reset(retryIn)
			laterAt = at
		}
		if pause := readGap - time.Since(readAt); pause > 0 {
			select { // moves announced meanwhile wait in s.watching.kicked
			case <-s.stop.Done():
				return
			case <-time.After(pause):
			}
		}
	}
}
