/* Draws GeoAgent's map JSON (geoagent.maps.data.MapData) on a Leaflet map.
 * GeoAgentMap.draw(element, data, options) -> {map, layers}; GeoAgentMap.blank(element, options) -> map (no data yet).
 * Every text from the data goes into the DOM as text (textContent), never as HTML; images are data: URIs made by GeoAgent. Markers are vector CircleMarkers. */
var GeoAgentMap = (function () {
  "use strict";

  var STYLE = {
    prediction: {radius: 12, color: "#000000", weight: 3, fillColor: "#ffffff", fillOpacity: 0.15},
    abstained: {radius: 12, color: "#888888", weight: 2, dashArray: "4 4", fillColor: "#ffffff", fillOpacity: 0.0},
    candidate: {radius: 7, color: "#222222", weight: 1, fillOpacity: 0.9},
    guess: {radius: 6, color: "#7b3294", weight: 2, dashArray: "3 3", fillColor: "#c2a5cf", fillOpacity: 0.5},
    exif: {radius: 9, color: "#006d2c", weight: 3, fillColor: "#74c476", fillOpacity: 0.6},
    prior: {color: "#e66101", weight: 1, fillColor: "#fdb863", fillOpacity: 0.35},
    truth: {radius: 4, color: "#000000", weight: 1, fillColor: "#000000", fillOpacity: 0.8},
    predicted: {radius: 4, weight: 1, color: "#333333", fillOpacity: 0.9}
  };
  var PRIOR_RADIUS = {min: 4, per_p: 16};  // a prior country's marker grows with its probability
  var SINGLE_POINT_ZOOM = 11;
  var WORLD = {center: [20, 0], zoom: 2};  // the view with nothing to show
  var FIT = {padding: 30, maxZoom: 14};

  function el(tag, text, parent) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (parent) parent.appendChild(node);
    return node;
  }

  /* Leaflet's layer switcher sets each name as HTML: a name from the data goes in as escaped text. */
  function asHtml(text) {
    var box = document.createElement("span");
    box.textContent = String(text);
    return box.innerHTML;
  }

  function coords(lat, lon) {
    return lat.toFixed(4) + ", " + lon.toFixed(4);
  }

  function num(value, digits) {
    return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
  }

  function popup() {
    var box = document.createElement("div");
    box.className = "geoagent-popup";
    return box;
  }

  function marker(lat, lon, style, kind, extra) {
    var options = {className: "geoagent-" + kind};
    var key;
    for (key in style) options[key] = style[key];
    for (key in (extra || {})) options[key] = extra[key];
    return L.circleMarker([lat, lon], options);
  }

  function placeText(place, countryName, country) {
    return [place, countryName || country].filter(function (x) { return x; }).join(", ") || "unknown place";
  }

  function priorList(prior, parent) {
    var list = el("ul", null, parent);
    prior.forEach(function (c) { el("li", c.name + " (" + c.country + ") " + num(c.p, 2), list); });
  }

  /* What the confidence means: a probability within confidence_km when calibrated, else a labelled score. */
  function confidenceText(photo) {
    if (photo.calibrated) return Math.round(photo.confidence * 100) + "% likely within " + num(photo.confidence_km, 0) + " km";
    return "confidence " + num(photo.confidence, 2) + " (uncalibrated score)";
  }

  function predictionPopup(photo, several) {
    var box = popup();
    if (photo.abstained) {
      el("b", "Unknown: " + photo.image, box);
      el("div", "below the minimum confidence: " + confidenceText(photo), box);
      el("div", "best guess (not an answer): " + placeText(photo.place, photo.country_name, photo.country) + " (" + coords(photo.lat, photo.lon) + ")", box);
      return box;
    }
    el("b", "Answer for " + photo.image, box);
    el("div", placeText(photo.place, photo.country_name, photo.country), box);
    el("div", coords(photo.lat, photo.lon) + " - " + confidenceText(photo), box);
    if (photo.match === "near_duplicate") el("div", "near-duplicate of an indexed photo", box);
    if (photo.exif) el("div", "EXIF GPS " + num(photo.exif.distance_km, 1) + " km away", box);
    if (several && photo.prior.length) {
      el("div", "prior:", box);
      priorList(photo.prior, box);
    }
    return box;
  }

  function candidatePopup(c, photo) {
    var box = popup();
    el("b", "#" + c.rank + " " + placeText(c.place, null, c.country), box);
    el("div", "score " + num(c.score, 3) + " - rank " + c.rank + " - retrieval " + num(c.retrieval_score, 3), box);
    el("div", c.source + " candidate " + c.id, box);
    el("div", coords(c.lat, c.lon) + " - for " + photo.image, box);
    if (c.thumbnail && c.thumbnail.indexOf("data:image/jpeg;base64,") === 0) {
      var img = el("img", null, box);
      img.alt = "reference photo " + c.id;
      img.src = c.thumbnail;
    }
    return box;
  }

  function guessPopup(g, photo) {
    var box = popup();
    el("b", "Reasoning guess " + g.sample + (g.consensus ? " (consensus)" : ""), box);
    el("div", g.country + " - " + coords(g.lat, g.lon) + " - confidence " + num(g.confidence, 2), box);
    el("div", "for " + photo.image, box);
    if (g.clues.length) {
      var list = el("ul", null, box);
      g.clues.forEach(function (clue) { el("li", clue, list); });
    }
    return box;
  }

  function exifPopup(photo) {
    var box = popup();
    el("b", "EXIF GPS of " + photo.image, box);
    el("div", coords(photo.exif.lat, photo.exif.lon), box);
    el("div", "the visual answer is " + num(photo.exif.distance_km, 1) + " km away", box);
    return box;
  }

  function priorPopup(c) {
    var box = popup();
    el("b", "Prior: " + c.name + " " + num(c.p, 2), box);
    if (c.at) el("div", "marker at " + c.at, box);
    return box;
  }

  function errorPopup(e, label) {
    var box = popup();
    el("b", e.image, box);
    el("div", "error " + num(e.error_km, 1) + " km (" + label + ")", box);
    el("div", "truth " + coords(e.true_lat, e.true_lon), box);
    el("div", "prediction " + coords(e.pred_lat, e.pred_lon), box);
    return box;
  }

  /* One photo's layers: prediction, candidates, guesses, EXIF, prior countries. */
  function photoLayers(photo, several, points) {
    var layers = {
      candidates: L.featureGroup(), guesses: L.featureGroup(), exif: L.featureGroup(), prior: L.featureGroup(),
      prediction: L.featureGroup()
    };
    photo.prior.forEach(function (c) {
      if (c.lat === null || c.lat === undefined) return;
      marker(c.lat, c.lon, STYLE.prior, "prior", {radius: PRIOR_RADIUS.min + PRIOR_RADIUS.per_p * c.p})
        .bindPopup(priorPopup(c)).addTo(layers.prior);
    });
    photo.guesses.forEach(function (g) {
      marker(g.lat, g.lon, STYLE.guess, "guess").bindPopup(guessPopup(g, photo)).addTo(layers.guesses);
      points.push([g.lat, g.lon]);
    });
    photo.candidates.slice().reverse().forEach(function (c) {  // the best candidate is drawn last: on top
      marker(c.lat, c.lon, STYLE.candidate, "candidate", {fillColor: c.color})
        .bindPopup(candidatePopup(c, photo)).addTo(layers.candidates);
      points.push([c.lat, c.lon]);
    });
    if (photo.exif) {
      marker(photo.exif.lat, photo.exif.lon, STYLE.exif, "exif").bindPopup(exifPopup(photo)).addTo(layers.exif);
      L.polyline([[photo.exif.lat, photo.exif.lon], [photo.lat, photo.lon]],
                 {color: STYLE.exif.color, weight: 2, dashArray: "6 4", className: "geoagent-exif-line"}).addTo(layers.exif);
      points.push([photo.exif.lat, photo.exif.lon]);
    }
    marker(photo.lat, photo.lon, photo.abstained ? STYLE.abstained : STYLE.prediction, photo.abstained ? "abstained" : "prediction")
      .bindPopup(predictionPopup(photo, several)).addTo(layers.prediction);
    points.push([photo.lat, photo.lon]);
    return layers;
  }

  function addPanel(map, build) {
    var Panel = L.Control.extend({
      onAdd: function () {
        var box = L.DomUtil.create("div", "geoagent-panel");
        L.DomEvent.disableClickPropagation(box);
        L.DomEvent.disableScrollPropagation(box);
        build(box);
        return box;
      }
    });
    new Panel({position: "bottomleft"}).addTo(map);
  }

  function keyRow(parent, color, text, border) {
    var row = el("div", null, parent);
    var swatch = el("span", null, row);
    swatch.className = "geoagent-key";
    swatch.style.background = color;
    if (border) swatch.style.borderColor = border;
    row.appendChild(document.createTextNode(text));
  }

  function photoPanel(data, box) {
    el("h1", data.title, box);
    var photos = data.photos;
    if (photos.length === 1) {
      var p = photos[0];
      el("div", p.image, box);
      el("div", (p.abstained ? "unknown (below the minimum confidence); best guess: " : "answer: ")
         + placeText(p.place, p.country_name, p.country) + " (" + coords(p.lat, p.lon) + ")", box);
      el("div", confidenceText(p) + " - " + p.candidates.length + " candidates - "
         + p.guesses.length + " reasoning guesses", box);
      if (p.exif) el("div", "EXIF GPS " + coords(p.exif.lat, p.exif.lon) + ", " + num(p.exif.distance_km, 1) + " km from the answer", box);
      if (p.prior.length) {
        el("h2", "prior countries", box);
        priorList(p.prior, box);
      }
    } else {
      el("div", photos.length + " photos" + (data.detailed_photos < photos.length
         ? "; candidates and guesses for the first " + data.detailed_photos : ""), box);
    }
    el("h2", "key", box);
    keyRow(box, "#ffffff", "the answer (ring)", "#000000");
    keyRow(box, data.score_ramp[data.score_ramp.length - 1], "candidates, coloured by final score:");
    var ramp = el("div", null, box);
    ramp.className = "geoagent-ramp";
    ramp.style.background = "linear-gradient(to right, " + data.score_ramp.join(", ") + ")";
    var labels = el("div", null, box);
    labels.className = "geoagent-ramp-labels";
    el("span", "lowest", labels);
    el("span", "highest", labels);
    var any = function (test) { return photos.some(test); };
    if (any(function (p) { return p.guesses.length; })) keyRow(box, STYLE.guess.fillColor, "reasoning guesses", STYLE.guess.color);
    if (any(function (p) { return p.exif; })) keyRow(box, STYLE.exif.fillColor, "EXIF GPS position", STYLE.exif.color);
    if (any(function (p) { return p.prior.length; })) {
      keyRow(box, STYLE.prior.fillColor, "prior countries (at the capital, sized by p)", STYLE.prior.color);
    }
  }

  function errorPanel(data, box) {
    el("h1", data.title, box);
    data.error_layers.forEach(function (layer) {
      el("div", layer.label + ": " + layer.errors.length + " photos drawn"
         + (layer.failed ? ", " + layer.failed + " without a prediction" : ""), box);
    });
    el("h2", "truth (black dot) to prediction, by error", box);
    data.error_bands.forEach(function (band) { keyRow(box, band.color, band.label); });
  }

  function drawPhotos(map, data, control, points) {
    var several = data.photos.length > 1;
    var overview = L.featureGroup();
    var all = [];
    data.photos.forEach(function (photo) {
      var layers = photoLayers(photo, several, points);
      all.push(layers);
      if (!several) {
        [["prior countries", layers.prior], ["reasoning guesses (" + photo.guesses.length + ")", layers.guesses],
         ["candidates (" + photo.candidates.length + ")", layers.candidates], ["EXIF GPS", layers.exif],
         ["answer", layers.prediction]].forEach(function (entry) {
          entry[1].addTo(map);
          if (entry[1].getLayers().length) control.addOverlay(entry[1], entry[0]);  // no switch for an empty layer
        });
        return;
      }
      layers.prediction.addTo(overview);
      if (!photo.detailed) return;
      var details = L.featureGroup([layers.prior, layers.guesses, layers.candidates, layers.exif]);
      if (data.details_shown) details.addTo(map);
      control.addOverlay(details, asHtml(photo.image));
    });
    if (several) {
      overview.addTo(map);
      control.addOverlay(overview, "answers (" + data.photos.length + ")");
    }
    return all;
  }

  function drawErrors(map, data, control, points) {
    var all = [];
    data.error_layers.forEach(function (layer) {
      var group = L.featureGroup();
      layer.errors.forEach(function (e) {
        var box = errorPopup(e, layer.label);
        L.polyline([[e.true_lat, e.true_lon], [e.pred_lat, e.pred_lon]],
                   {color: e.color, weight: 3, opacity: 0.9, className: "geoagent-error"}).bindPopup(box).addTo(group);
        marker(e.true_lat, e.true_lon, STYLE.truth, "truth").bindPopup(errorPopup(e, layer.label)).addTo(group);
        marker(e.pred_lat, e.pred_lon, STYLE.predicted, "predicted", {fillColor: e.color})
          .bindPopup(errorPopup(e, layer.label)).addTo(group);
        points.push([e.true_lat, e.true_lon], [e.pred_lat, e.pred_lon]);
      });
      group.addTo(map);
      control.addOverlay(group, asHtml(layer.label + " (" + layer.errors.length + ")"));
      all.push(group);
    });
    return all;
  }

  /* A Leaflet map on `element` with its basemap: `tiles` (a tile URL template; null or "" for none). */
  function baseMap(element, tiles, attribution) {
    var map = L.map(element, {worldCopyJump: true});
    if (tiles) L.tileLayer(tiles, {attribution: attribution, maxZoom: 19}).addTo(map);
    return map;
  }

  /* The basemap alone, the whole world in view: a page's map before there is an answer to draw. */
  function blank(element, options) {
    var opts = options || {};
    var map = baseMap(element, opts.tiles, opts.attribution);
    map.setView(WORLD.center, WORLD.zoom);
    return map;
  }

  /* options (optional): {tiles, attribution} replace the data's basemap (tiles null or "" draws none);
   * {panel: false} leaves out the summary and key panel, for a page that explains the answer beside the map. */
  function draw(element, data, options) {
    var opts = options || {};
    var map = "tiles" in opts ? baseMap(element, opts.tiles, opts.attribution) : baseMap(element, data.tiles_url, data.tiles_attribution);
    var control = L.control.layers(null, null, {collapsed: false}).addTo(map);
    L.control.scale().addTo(map);
    var points = [];
    var errors = data.error_layers.length > 0;
    var layers = errors ? drawErrors(map, data, control, points) : drawPhotos(map, data, control, points);
    if (opts.panel !== false) addPanel(map, function (box) { (errors ? errorPanel : photoPanel)(data, box); });
    var bounds = L.latLngBounds(points);
    if (!points.length) map.setView(WORLD.center, WORLD.zoom);
    else if (bounds.getNorthEast().equals(bounds.getSouthWest())) map.setView(bounds.getCenter(), SINGLE_POINT_ZOOM);
    else {
      var panel = element.querySelector(".geoagent-panel");  // bottom left: keep the points clear of it
      map.fitBounds(bounds, {paddingTopLeft: [FIT.padding + (panel ? panel.offsetWidth : 0), FIT.padding],
                             paddingBottomRight: [FIT.padding, FIT.padding], maxZoom: FIT.maxZoom});
    }
    return {map: map, layers: layers};
  }

  return {draw: draw, blank: blank};
})();
