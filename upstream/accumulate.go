package upstream

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// accumulator rebuilds the Message object a non-streaming call would have
// returned from the raw stream events, keeping every field the upstream sent
// (the SDK's typed Message would add zero-valued fields of its own).
type accumulator struct {
	msg     map[string]any
	blocks  []map[string]any
	partial map[int]*strings.Builder // tool_use input JSON, by block index
	stopped bool
}

func newAccumulator() *accumulator {
	return &accumulator{partial: map[int]*strings.Builder{}}
}

type rawEvent struct {
	Type         string          `json:"type"`
	Message      map[string]any  `json:"message"`
	Index        int             `json:"index"`
	ContentBlock map[string]any  `json:"content_block"`
	Delta        json.RawMessage `json:"delta"`
	Usage        map[string]any  `json:"usage"`
}

type rawDelta struct {
	Type        string          `json:"type"`
	Text        string          `json:"text"`
	PartialJSON string          `json:"partial_json"`
	Thinking    string          `json:"thinking"`
	Signature   string          `json:"signature"`
	Citation    json.RawMessage `json:"citation"`
}

// keep makes fields, but those named in skip, the Message's own at its
// top level, kept as sent. A null does not undo a value already there, but
// names a field not yet present, as the API's Message has it.
func (a *accumulator) keep(fields map[string]json.RawMessage, skip ...string) {
	for k, v := range fields {
		if slices.Contains(skip, k) {
			continue
		}
		if _, had := a.msg[k]; had && isNull(v) {
			continue
		}
		a.msg[k] = v
	}
}

// isNull reports whether a JSON value is null (or missing).
func isNull(v json.RawMessage) bool {
	v = bytes.TrimSpace(v)
	return len(v) == 0 || string(v) == "null"
}

func (a *accumulator) add(typ string, raw []byte) error {
	switch typ {
	case "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop":
	default:
		return nil // ping and unknown events are tolerated
	}
	var ev rawEvent
	if err := json.Unmarshal(raw, &ev); err != nil {
		return err
	}
	switch typ {
	case "message_start":
		if ev.Message == nil {
			return errors.New("message_start without message")
		}
		a.msg = ev.Message
	case "content_block_start":
		if a.msg == nil {
			return errors.New("content_block_start before message_start")
		}
		for len(a.blocks) <= ev.Index {
			a.blocks = append(a.blocks, nil)
		}
		a.blocks[ev.Index] = ev.ContentBlock
	case "content_block_delta":
		if ev.Index >= len(a.blocks) || a.blocks[ev.Index] == nil {
			return fmt.Errorf("delta for unknown block %d", ev.Index)
		}
		var d rawDelta
		if err := json.Unmarshal(ev.Delta, &d); err != nil {
			return err
		}
		b := a.blocks[ev.Index]
		switch d.Type {
		case "text_delta":
			s, _ := b["text"].(string)
			b["text"] = s + d.Text
		case "input_json_delta":
			sb := a.partial[ev.Index]
			if sb == nil {
				sb = &strings.Builder{}
				a.partial[ev.Index] = sb
			}
			sb.WriteString(d.PartialJSON)
		case "thinking_delta":
			s, _ := b["thinking"].(string)
			b["thinking"] = s + d.Thinking
		case "signature_delta":
			s, _ := b["signature"].(string)
			b["signature"] = s + d.Signature
		case "citations_delta":
			var c any
			if err := json.Unmarshal(d.Citation, &c); err == nil {
				list, _ := b["citations"].([]any)
				b["citations"] = append(list, c)
			}
		}
	case "content_block_stop":
		if sb := a.partial[ev.Index]; sb != nil && ev.Index < len(a.blocks) {
			var input any
			if sb.Len() == 0 {
				input = map[string]any{}
			} else if err := json.Unmarshal([]byte(sb.String()), &input); err != nil {
				return fmt.Errorf("tool input of block %d: %w", ev.Index, err)
			}
			a.blocks[ev.Index]["input"] = input
			delete(a.partial, ev.Index)
		}
	case "message_delta":
		if a.msg == nil {
			return errors.New("message_delta before message_start")
		}
		// Every field of the delta is the Message's own at its top level
		// (stop_reason, stop_sequence, and whatever else the API sends
		// there: stop_details, container, newer ones), and so are the
		// event's own fields beside delta and usage (context_management,
		// input_transformations), as the SDKs' accumulators make them.
		var d, top map[string]json.RawMessage
		if err := json.Unmarshal(ev.Delta, &d); err != nil {
			return err
		}
		if err := json.Unmarshal(raw, &top); err != nil {
			return err
		}
		// The blocks and usage are built apart.
		a.keep(d, "content", "usage")
		a.keep(top, "type", "delta", "usage", "content")
		usage, _ := a.msg["usage"].(map[string]any)
		if usage == nil {
			usage = map[string]any{}
			a.msg["usage"] = usage
		}
		for k, v := range ev.Usage { // cumulative: the latest value wins
			if v != nil {
				usage[k] = v
			}
		}
	case "message_stop":
		a.stopped = true
	}
	return nil
}

func (a *accumulator) result() (json.RawMessage, string, Usage, error) {
	var u Usage
	if a.msg == nil {
		return nil, "", u, errors.New("no message_start")
	}
	content := make([]any, 0, len(a.blocks))
	var text strings.Builder
	for _, b := range a.blocks {
		if b == nil {
			continue
		}
		content = append(content, b)
		if b["type"] == "text" {
			s, _ := b["text"].(string)
			text.WriteString(s)
		}
	}
	a.msg["content"] = content
	raw, err := marshalMessage(a.msg)
	if err != nil {
		return nil, "", u, err
	}
	if ub, err := json.Marshal(a.msg["usage"]); err == nil {
		_ = json.Unmarshal(ub, &u)
	}
	return raw, text.String(), u, nil
}

// messageOrder is the field order of the API's own Message objects, so a
// stored result reads like the upstream's; fields it does not name follow,
// sorted.
var messageOrder = []string{"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "stop_details", "usage"}

func marshalMessage(m map[string]any) ([]byte, error) {
	keys := make([]string, 0, len(m))
	for _, k := range messageOrder {
		if _, ok := m[k]; ok {
			keys = append(keys, k)
		}
	}
	var rest []string
	for k := range m {
		if !slices.Contains(messageOrder, k) {
			rest = append(rest, k)
		}
	}
	slices.Sort(rest)
	keys = append(keys, rest...)
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		vb, err := json.Marshal(m[k])
		if err != nil {
			return nil, err
		}
		b.Write(kb)
		b.WriteByte(':')
		b.Write(vb)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// partialUsage is the usage of a stream that stopped early: the input the
// upstream reported in message_start (or a later message_delta) and, for
// output, the larger of what it reported and an estimate from the text
// received (3 bytes a token).
func (a *accumulator) partialUsage() Usage {
	var u Usage
	if a.msg == nil {
		return u
	}
	if ub, err := json.Marshal(a.msg["usage"]); err == nil {
		_ = json.Unmarshal(ub, &u)
	}
	n := 0
	for _, b := range a.blocks {
		if s, ok := b["text"].(string); ok {
			n += len(s)
		}
		if s, ok := b["thinking"].(string); ok {
			n += len(s)
		}
	}
	for _, sb := range a.partial {
		n += sb.Len()
	}
	u.OutputTokens = max(u.OutputTokens, (n+2)/3)
	return u
}
