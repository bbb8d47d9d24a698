'use strict';
// The compiled addon (built by node-gyp when npm installs this optional package).
module.exports = require('./build/Release/malloc_trim.node');
