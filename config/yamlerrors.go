package config

import (
	"fmt"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// fieldError is one problem with the configuration, at a path such as
// "model_groups[1].rpm".
type fieldError struct {
	Path string
	Msg  string
	// under marks a problem that leaves the values at Path and below
	// unreliable (a field the decoder could not read, or a list element it
	// dropped); validation problems there are left out.
	under []string
}

func (e *fieldError) Error() string {
	if e.Path == "" {
		return e.Msg
	}
	return e.Path + ": " + e.Msg
}

// coveredBy reports whether path lies under a decoding problem.
func coveredBy(path string, decodeErrs []*fieldError) bool {
	for _, e := range decodeErrs {
		for _, u := range e.under {
			if within(path, u) {
				return true
			}
		}
	}
	return false
}

// within reports whether path is prefix or lies below it.
func within(path, prefix string) bool {
	if prefix == "" || path == prefix {
		return true
	}
	return strings.HasPrefix(path, prefix) && (path[len(prefix)] == '.' || path[len(prefix)] == '[')
}

// parentPath is the path of the mapping or list that holds path.
func parentPath(path string) string {
	i := strings.LastIndexAny(path, ".[")
	if i < 0 {
		return ""
	}
	return path[:i]
}

// affected lists the paths a decoding problem at path makes unreliable: the
// path itself and, for a list element (which yaml.v3 drops, shifting the
// elements after it), the whole list.
func affected(path string) []string {
	if strings.HasSuffix(path, "]") {
		return []string{path, parentPath(path)}
	}
	return []string{path}
}

// docNode is one node of the document with its config path.
type docNode struct {
	path string
	node *yaml.Node
	key  bool // a mapping key; path is that of its value
}

// indexDoc lists the nodes of the document in order, with their paths.
func indexDoc(root *yaml.Node) []docNode {
	var out []docNode
	var walk func(n *yaml.Node, path string)
	walk = func(n *yaml.Node, path string) {
		switch n.Kind {
		case yaml.DocumentNode:
			for _, c := range n.Content {
				walk(c, path)
			}
		case yaml.MappingNode:
			out = append(out, docNode{path: path, node: n})
			for i := 0; i+1 < len(n.Content); i += 2 {
				k, v := n.Content[i], n.Content[i+1]
				p := k.Value
				if path != "" {
					p = path + "." + k.Value
				}
				out = append(out, docNode{path: p, node: k, key: true})
				walk(v, p)
			}
		case yaml.SequenceNode:
			out = append(out, docNode{path: path, node: n})
			for i, c := range n.Content {
				walk(c, fmt.Sprintf("%s[%d]", path, i))
			}
		case yaml.ScalarNode:
			out = append(out, docNode{path: path, node: n})
		}
	}
	walk(root, "")
	return out
}

var (
	reLine      = regexp.MustCompile(`^line (\d+): (.*)$`)
	reUnknown   = regexp.MustCompile(`^field (\S+) not found in type (\S+)$`)
	reDuplicate = regexp.MustCompile(`^mapping key "(.*)" already defined at line (\d+)$`)
	reCannot    = regexp.MustCompile("^cannot unmarshal (!!\\w+)(?: `(.*)`)? into (\\S+)$")
)

// decodeProblems turns yaml.v3's "line N: ..." decoding messages into
// problems at config paths, and adds the list items left empty, which yaml.v3
// drops without a word.
func decodeProblems(root *yaml.Node, msgs []string) []*fieldError {
	nodes := indexDoc(root)
	var errs []*fieldError
	for _, m := range msgs {
		errs = append(errs, explainTypeError(nodes, m))
	}
	for _, n := range nodes {
		if n.node.Kind == yaml.ScalarNode && !n.key && n.node.ShortTag() == "!!null" && strings.HasSuffix(n.path, "]") {
			errs = append(errs, &fieldError{Path: n.path, Msg: fmt.Sprintf("empty list item (line %d)", n.node.Line), under: affected(n.path)})
		}
	}
	return errs
}

func explainTypeError(nodes []docNode, msg string) *fieldError {
	lm := reLine.FindStringSubmatch(msg)
	if lm == nil {
		return &fieldError{Msg: msg, under: []string{""}}
	}
	line, _ := strconv.Atoi(lm[1])
	text := lm[2]
	at := fmt.Sprintf(" (line %d)", line)

	keyAt := func(name string) (string, bool) {
		for _, n := range nodes {
			if n.key && n.node.Line == line && n.node.Value == name {
				return n.path, true
			}
		}
		return "", false
	}

	if m := reUnknown.FindStringSubmatch(text); m != nil {
		path, ok := keyAt(m[1])
		if !ok {
			return &fieldError{Msg: msg}
		}
		if path == "upstream.api_key" {
			return &fieldError{Path: path, Msg: "the upstream API key is a secret and is read only from the environment variable " + envAPIKey + "; remove it from the file" + at}
		}
		msg := "unknown field"
		if fields := yamlFields(m[2]); fields != "" {
			msg += "; the fields here are " + fields
		}
		return &fieldError{Path: path, Msg: msg + at}
	}

	if m := reDuplicate.FindStringSubmatch(text); m != nil {
		path, ok := keyAt(m[1])
		if !ok {
			return &fieldError{Msg: msg, under: []string{""}}
		}
		// yaml.v3 skips the whole mapping that holds a repeated key.
		return &fieldError{Path: path, Msg: fmt.Sprintf("given twice (lines %s and %d)", m[2], line), under: affected(parentPath(path))}
	}

	if m := reCannot.FindStringSubmatch(text); m != nil {
		tag, value, goType := m[1], m[2], m[3]
		want := wantKind(tag)
		var best *docNode
		for i := range nodes {
			n := &nodes[i]
			if n.key || n.node.Line != line || n.node.Kind != want {
				continue
			}
			if want == yaml.ScalarNode && !truncatedEqual(n.node.Value, value) {
				continue
			}
			// The deepest candidate: a list or mapping that starts on the
			// same line as the element inside it is not the one at fault.
			if best == nil || len(n.path) > len(best.path) {
				best = n
			}
		}
		if best == nil {
			return &fieldError{Msg: msg, under: []string{""}}
		}
		msg := fmt.Sprintf("want %s, got %s%s", describeType(goType), describeValue(tag, value), at)
		if best.path == "" {
			msg = "top level: " + msg
		}
		return &fieldError{Path: best.path, Msg: msg, under: affected(best.path)}
	}
	return &fieldError{Msg: msg, under: []string{""}}
}

func wantKind(tag string) yaml.Kind {
	switch tag {
	case "!!map":
		return yaml.MappingNode
	case "!!seq":
		return yaml.SequenceNode
	}
	return yaml.ScalarNode
}

// truncatedEqual compares a scalar with the value yaml.v3 quotes in its
// messages, which it cuts to 7 characters and "..." past 10.
func truncatedEqual(full, quoted string) bool {
	if len(full) > 10 {
		return len(full) >= 7 && quoted == full[:7]+"..."
	}
	return full == quoted
}

func describeType(goType string) string {
	switch {
	case goType == "time.Duration":
		return `a duration such as "30s" or "10m"`
	case strings.HasPrefix(goType, "int") || strings.HasPrefix(goType, "uint"):
		return "a whole number"
	case goType == "bool":
		return "true or false"
	case goType == "string":
		return "a string"
	case strings.HasPrefix(goType, "[]"):
		return "a list"
	case strings.HasPrefix(goType, "config."):
		return "a mapping of fields"
	}
	return goType
}

func describeValue(tag, value string) string {
	switch tag {
	case "!!map":
		return "a mapping"
	case "!!seq":
		return "a list"
	case "!!str":
		return strconv.Quote(value)
	}
	return value
}

// yamlFields lists the YAML field names of the config struct that yaml.v3
// names typeName in its messages.
func yamlFields(typeName string) string {
	var t reflect.Type
	switch typeName {
	case "config.Config":
		t = reflect.TypeFor[Config]()
	case "config.Upstream":
		t = reflect.TypeFor[Upstream]()
	case "config.Tenant":
		t = reflect.TypeFor[Tenant]()
	case "config.ModelGroup":
		t = reflect.TypeFor[ModelGroup]()
	case "config.API":
		t = reflect.TypeFor[API]()
	case "config.Worker":
		t = reflect.TypeFor[Worker]()
	case "config.Log":
		t = reflect.TypeFor[Log]()
	case "config.UserPolicy":
		t = reflect.TypeFor[UserPolicy]()
	default:
		return ""
	}
	return strings.Join(yamlNames(t), ", ")
}

// yamlNames lists the YAML field names of a struct, inlined structs
// included.
func yamlNames(t reflect.Type) []string {
	var names []string
	for i := range t.NumField() {
		name, opts, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ",")
		if name == "" && strings.Contains(opts, "inline") {
			names = append(names, yamlNames(t.Field(i).Type)...)
			continue
		}
		if name != "" && name != "-" {
			names = append(names, name)
		}
	}
	return names
}
