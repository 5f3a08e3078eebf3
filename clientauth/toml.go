package clientauth

import (
	"bytes"
	"errors"
	"fmt"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"
)

// decodeTOML decodes data, read from path, into v, refusing unknown keys
// (a misspelt "revoked" must not pass unnoticed). Its errors are
// *FileError naming the line.
func decodeTOML(path string, data []byte, v any) error {
	err := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields().Decode(v)
	if err == nil {
		return nil
	}
	var de *toml.DecodeError
	var se *toml.StrictMissingError
	switch {
	case errors.As(err, &se) && len(se.Errors) > 0:
		e := se.Errors[0]
		line, _ := e.Position()
		return &FileError{Path: path, Line: line, Err: fmt.Errorf("unknown key %q", strings.Join(e.Key(), "."))}
	case errors.As(err, &de):
		line, _ := de.Position()
		return &FileError{Path: path, Line: line, Err: errors.New(strings.TrimPrefix(de.Error(), "toml: "))}
	}
	return &FileError{Path: path, Err: errors.New(strings.TrimPrefix(err.Error(), "toml: "))}
}

// tomlLines maps the keys of a TOML document to the lines that set them,
// so that an error found after decoding can name its line. Keys are dotted
// paths; the n-th table of an array of tables is "name[n]" (the line of its
// header), so the "role" of the second [[client]] is "client[1].role".
// A document that does not parse gives a partial map.
func tomlLines(data []byte) map[string]int {
	lines := map[string]int{}
	count := map[string]int{}
	prefix := ""
	var p unstable.Parser
	p.Reset(data)
	for p.NextExpression() {
		e := p.Expression()
		switch e.Kind {
		case unstable.Table, unstable.ArrayTable, unstable.KeyValue:
		default:
			continue
		}
		var parts []string
		line := 0
		it := e.Key()
		for it.Next() {
			k := it.Node()
			if line == 0 {
				line = p.Shape(k.Raw).Start.Line
			}
			parts = append(parts, string(k.Data))
		}
		key := strings.Join(parts, ".")
		switch e.Kind {
		case unstable.Table:
			prefix = key + "."
			lines[key] = line
		case unstable.ArrayTable:
			name := fmt.Sprintf("%s[%d]", key, count[key])
			count[key]++
			prefix = name + "."
			lines[name] = line
		case unstable.KeyValue:
			lines[prefix+key] = line
		}
	}
	return lines
}

// lineOf returns the line of the first of keys that tomlLines found, or 0.
func lineOf(lines map[string]int, keys ...string) int {
	for _, k := range keys {
		if l, ok := lines[k]; ok {
			return l
		}
	}
	return 0
}
