"""Answers on a map: one self-contained HTML file (Leaflet inlined, data as JSON) that opens without a network.

:mod:`geoagent.maps.data` turns results into the map's JSON (``MapData``); :mod:`geoagent.maps.html` renders
it into a page with the vendored Leaflet (``static/leaflet``) and the drawing script ``static/geoagent-map.js``,
which a web page can reuse by calling ``GeoAgentMap.draw(element, data)`` on the same JSON.
"""
